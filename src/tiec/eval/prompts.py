"""Benchmark prompts: the demo's class names, a text file (one prompt a line) or COCO captions JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence


def load_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a text file (one per line, blank lines skipped) or a COCO captions JSON.

    A COCO captions file is a JSON object ``{"annotations": [{"caption": ...}, ...]}`` (as
    ``captions_val2017.json``); its captions are taken in file order.

    Example:
        >>> _ = Path("prompts.txt").write_text("a photo of a cat\\n\\na red bus\\n")
        >>> load_prompts("prompts.txt")
        ['a photo of a cat', 'a red bus']
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"--prompts {path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"--prompts {path} is a folder; expected a text file with one prompt per line or a COCO "
                         f"captions JSON") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts {path} is not UTF-8 text (byte {e.start}: {e.reason}); expected a text file "
                         f"with one prompt per line or a COCO captions JSON") from None
    if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--prompts {path}: not valid JSON ({e}); expected a COCO captions file "
                             f'{{"annotations": [{{"caption": ...}}]}} or a text file with one prompt per line') from None
        annotations = data.get("annotations") if isinstance(data, dict) else None
        if not isinstance(annotations, list):
            raise ValueError(f'--prompts {path}: JSON without an "annotations" list; expected a COCO captions file '
                             f'{{"annotations": [{{"caption": ...}}]}}')
        prompts = [str(a["caption"]).strip() for a in annotations if isinstance(a, dict) and a.get("caption")]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path}: holds no prompts")
    return prompts


def demo_prompts() -> list[str]:
    """The demo model's prompts: its class names, one each, in class order.

    Example:
        >>> demo_prompts()[:2]
        ['t-shirt', 'trouser']
    """
    from ..demo import CLASSES

    return list(CLASSES)


def cycle(prompts: Sequence[str], count: int) -> list[str]:
    """``count`` prompts, cycling through ``prompts``: image ``i`` gets ``prompts[i % len(prompts)]``.

    Example:
        >>> cycle(["a", "b"], 3)
        ['a', 'b', 'a']
    """
    if not prompts:
        raise ValueError("prompts is empty; give at least one prompt")
    return [prompts[i % len(prompts)] for i in range(count)]
