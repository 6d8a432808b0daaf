"""What llama.cpp logged while something ran: its lines reach the
`pymoe.llama` logger, which is silent by default."""
import logging
import re
from typing import Callable, List

MiB = 1 << 20


def lines_during(run: Callable[[], object]) -> List[str]:
    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logger = logging.getLogger("pymoe.llama")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        run()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return lines


def rpc_buffers(lines: List[str], kind: str) -> List[float]:
    """Bytes of each "<RPC device> <kind> buffer size = X MiB" line: kind KV, RS
    (recurrent state) or compute (llama.cpp prints MiB with two decimals)."""
    return [float(m.group(1)) * MiB for line in lines
            if (m := re.search(rf"RPC\d+\[[^\]]+\] +{kind} buffer size =\s+([\d.]+) MiB", line))]
