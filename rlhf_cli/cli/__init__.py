"""The command-line layer: argv, config files and presets, composition, validation (none of it
imports torch), and how a run ends (exit codes, messages)."""
