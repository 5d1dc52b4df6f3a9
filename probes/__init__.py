"""BPF programs (espfix.bpf.c) and their BCC loaders."""
