"""reprovision: a reproducible computer-vision workflow (DVC stages in stages/, this library beneath them)."""
