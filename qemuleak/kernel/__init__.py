"""What we know about the running kernel: symbols, KASLR, structure layouts."""
