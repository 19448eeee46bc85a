"""Process groups, Megatron parallel state, seeding and the CPU mode."""

from igrpo_megatron.runtime.cpu_mode import cpu_mode, cpu_mode_active, disable_cpu_mode, enable_cpu_mode

__all__ = ["cpu_mode", "cpu_mode_active", "disable_cpu_mode", "enable_cpu_mode"]
