"""Speed and accuracy figures, each a module run from the repository root
(`python -m benchmarks.layer_speed`); results/ holds their JSON, tables and plots."""
