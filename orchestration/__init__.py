"""When and where vectorsync runs: Dagster definitions, resources, sensors, schedules, the CLI."""
