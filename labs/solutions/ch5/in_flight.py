"""Solution ch5.3. GPipe runs every forward before the first backward; 1F1B caps the warm-up."""


def peak_in_flight(schedule: str, p: int, m: int, rank: int) -> int:
    if schedule == "gpipe":
        return m
    if schedule == "1f1b":
        return min(m, p - rank)
    raise ValueError(f"unknown schedule {schedule!r}")
