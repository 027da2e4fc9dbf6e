"""`rlhf <stage>` entry points, one module each."""
