"""Shared by tools/bench_train.py and tools/bench_generate.py."""


def cpu_model():
    """The CPU's model name (/proc/cpuinfo), printed beside every figure: they compare only on the same CPU."""
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"
