"""Human-rated word lexicons shipped in Python packages, each loaded as a task for the sharpness study.

    python benchmarks/lexicon_tasks.py        # sizes, scales and word overlaps of every task

| task | package (file) | raters' scale | target |
|---|---|---|---|
| ``vader_valence`` | vadersentiment (``vader_lexicon.txt``) | valence −4..4, mean of 10 raters | rating / 4 |
| ``warriner_valence``, ``_arousal``, ``_dominance`` | labMTsimple (``data/WK/BRM-emot-submit.csv``) | 1..9, mean of ~20 raters | (rating − 5) / 4 |
| ``labmt_happiness`` | labMTsimple (``data/LabMT/labMT1.txt``) | happiness 1..9, mean of 50 raters | (rating − 5) / 4 |
| ``afinn_valence`` | afinn (``data/AFINN-en-165.txt``) | integer valence −5..5, one annotator | rating / 5 |
| ``nrc_emotion`` | nrclex (``data/nrc_en.json``) | ten yes/no emotion and sentiment associations | 0/1 per label |

Every regression target is the raters' mean mapped linearly onto [−1, 1]. Warriner's norms also carry
the mean of each rater group (men/women, younger/older, lower/higher education): ``Task.groups``.

Splits, by a hash of the word alone, so the same word falls in the same split in every task:
``test`` when ``crc32(word) % 5 == 0`` (the main job's rule, ``examples/finetune_minilm.py``), else
``validation`` when ``adler32(word) % 10 == 0`` (``benchmarks/compare_methods.py``'s rule), else
``train``: about 72/8/20 %. VADER's split here is exactly the main job's (its 14 entries listed twice
with two ratings are one word here, with the mean rating). Words are matched across tasks as they are
written (all lexicons are lower case).

The lexicon packages are optional: ``pip install 'flatlora-kernels[experiments]'``; a task whose
package is missing raises ``ModuleNotFoundError`` naming it.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

Target = Union[float, tuple]

NRC_LABELS = ("anger", "anticipation", "disgust", "fear", "joy", "negative", "positive", "sadness", "surprise",
              "trust")
WARRINER_GROUPS = {"M": "men", "F": "women", "Y": "younger", "O": "older", "L": "lower_education",
                   "H": "higher_education"}
SPLITS = ("train", "validation", "test")


def split_of(word: str) -> str:
    """``train``, ``validation`` or ``test``, from hashes of the word (see the module's docstring)."""
    if zlib.crc32(word.encode()) % 5 == 0:
        return "test"
    return "validation" if zlib.adler32(word.encode()) % 10 == 0 else "train"


@dataclass(frozen=True)
class Task:
    """One lexicon as a task: word -> target, with the scale it was rated on."""

    name: str
    kind: str                                  # "regression" (one output) or "multilabel" (one per label)
    labels: tuple[str, ...]                    # the outputs' names
    scale: tuple[float, float]                 # the raters' scale, before mapping onto [-1, 1]
    source: str                                # package and file
    targets: dict[str, Target]
    groups: dict[str, dict[str, float]] = field(default_factory=dict)  # rater group -> word -> target

    def split(self, part: str) -> list[tuple[str, Target]]:
        """(word, target) pairs of one split, in the lexicon's order."""
        if part not in SPLITS:
            raise ValueError(f"part must be one of {SPLITS}, got {part!r}")
        return [(word, y) for word, y in self.targets.items() if split_of(word) == part]

    @property
    def outputs(self) -> int:
        return len(self.labels)


def package_file(package: str, pip_name: str, relative: str, task: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"the {task} task reads {relative} from the {pip_name!r} package, which is not "
                                  f"installed: pip install 'flatlora-kernels[experiments]' (or pip install {pip_name})")
    path = Path(spec.origin).parent / relative
    if not path.is_file():
        raise FileNotFoundError(f"the {task} task needs {path}, which the installed {pip_name!r} lacks")
    return path


def _to_unit(value: float, low: float, high: float) -> float:
    return (2.0 * value - low - high) / (high - low)


def vader_valence() -> Task:
    package_file("vaderSentiment", "vadersentiment", "vader_lexicon.txt", "vader_valence")
    import finetune_minilm as job  # the main job's loader: (text, rating / 4)

    ratings: dict[str, list[float]] = {}
    for text, rating in sum(job.load_lexicon(), []):
        ratings.setdefault(text, []).append(rating)
    # 14 entries are listed twice with different ratings (e.g. "lol", "d:"): a word is one entry, their mean
    return Task("vader_valence", "regression", ("valence",), (-4.0, 4.0), "vadersentiment: vader_lexicon.txt",
                {text: sum(values) / len(values) for text, values in ratings.items()})


def warriner(dimension: str) -> Task:
    """``dimension``: ``valence``, ``arousal`` or ``dominance`` (Warriner, Kuperman & Brysbaert 2013)."""
    column = {"valence": "V", "arousal": "A", "dominance": "D"}[dimension]
    name = f"warriner_{dimension}"
    path = package_file("labMTsimple", "labMTsimple", "data/WK/BRM-emot-submit.csv", name)
    targets, groups = {}, {group: {} for group in WARRINER_GROUPS.values()}
    with path.open(encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            word = row["Word"]
            targets[word] = _to_unit(float(row[f"{column}.Mean.Sum"]), 1.0, 9.0)
            for code, group in WARRINER_GROUPS.items():
                value = row[f"{column}.Mean.{code}"]
                if value not in ("", "NA"):
                    groups[group][word] = _to_unit(float(value), 1.0, 9.0)
    return Task(name, "regression", (dimension,), (1.0, 9.0), "labMTsimple: data/WK/BRM-emot-submit.csv", targets,
                groups)


def labmt_happiness() -> Task:
    path = package_file("labMTsimple", "labMTsimple", "data/LabMT/labMT1.txt", "labmt_happiness")
    targets = {}
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:  # first line: column names
        parts = line.split("\t")
        if len(parts) >= 3:
            targets[parts[0]] = _to_unit(float(parts[2]), 1.0, 9.0)
    return Task("labmt_happiness", "regression", ("happiness",), (1.0, 9.0), "labMTsimple: data/LabMT/labMT1.txt",
                targets)


def afinn_valence() -> Task:
    path = package_file("afinn", "afinn", "data/AFINN-en-165.txt", "afinn_valence")
    targets = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        word, _, score = line.rpartition("\t")
        if word:
            targets[word] = _to_unit(float(score), -5.0, 5.0)
    return Task("afinn_valence", "regression", ("valence",), (-5.0, 5.0), "afinn: data/AFINN-en-165.txt", targets)


def nrc_emotion() -> Task:
    path = package_file("nrclex", "nrclex", "data/nrc_en.json", "nrc_emotion")
    lexicon = json.loads(path.read_text(encoding="utf-8"))
    unknown = {label for labels in lexicon.values() for label in labels} - set(NRC_LABELS)
    if unknown:
        raise ValueError(f"{path}: labels outside the ten NRC labels: {sorted(unknown)}")
    targets = {word: tuple(float(label in labels) for label in NRC_LABELS) for word, labels in lexicon.items()
               if labels}
    return Task("nrc_emotion", "multilabel", NRC_LABELS, (0.0, 1.0), "nrclex: data/nrc_en.json", targets)


LOADERS = {
    "vader_valence": vader_valence,
    "warriner_valence": lambda: warriner("valence"),
    "warriner_arousal": lambda: warriner("arousal"),
    "warriner_dominance": lambda: warriner("dominance"),
    "labmt_happiness": labmt_happiness,
    "afinn_valence": afinn_valence,
    "nrc_emotion": nrc_emotion,
}


def load_task(name: str) -> Task:
    if name not in LOADERS:
        raise ValueError(f"unknown task {name!r}; the tasks are {sorted(LOADERS)}")
    return LOADERS[name]()


def overlaps(tasks: list[Task]) -> dict[tuple[str, str], int]:
    """Number of words each pair of tasks shares (a task with itself: its size)."""
    return {(a.name, b.name): len(a.targets.keys() & b.targets.keys()) for a in tasks for b in tasks}


def main() -> None:
    tasks = [load_task(name) for name in LOADERS]
    print("| task | kind | scale | words | train | validation | test |\n|---|---|---|---|---|---|---|")
    for task in tasks:
        sizes = [len(task.split(part)) for part in SPLITS]
        print(f"| {task.name} | {task.kind} | {task.scale[0]:g}..{task.scale[1]:g} | {len(task.targets)} | "
              + " | ".join(map(str, sizes)) + " |")
    shared = overlaps(tasks)
    print("\nwords shared\n\n| | " + " | ".join(t.name for t in tasks) + " |\n" + "|---" * (len(tasks) + 1) + "|")
    for a in tasks:
        print(f"| {a.name} | " + " | ".join(str(shared[a.name, b.name]) for b in tasks) + " |")


if __name__ == "__main__":
    main()
