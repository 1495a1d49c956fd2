"""Parallelism on torch.distributed: tensor parallel, pipeline schedules and ZeRO."""
