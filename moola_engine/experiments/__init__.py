"""Many runs: the ablation grid, its statistics and its report."""
