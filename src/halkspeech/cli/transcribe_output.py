"""Where `halkspeech transcribe` puts results: stdout (one line or block per input) or one file per input."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from halkspeech.errors import InvalidRequest
from halkspeech.transcription.formats import as_json, as_srt, as_verbose_json, as_vtt
from halkspeech.transcription.subtitles import READABLE, SubtitleOptions
from halkspeech.transcription.types import Transcript

EXTENSIONS = {"text": ".txt", "json": ".json", "verbose_json": ".json", "srt": ".srt", "vtt": ".vtt"}


class Output:
    """Renders transcripts in one format to stdout or to `output_dir`.

    On stdout, several inputs give one line each for text and JSON (JSON objects gain a `file` field) and a
    `==> FILE <==` header before each srt/vtt block; a single input prints just its transcript.
    """

    def __init__(
        self,
        fmt: str,
        output_dir: Path | None,
        *,
        task: str = "transcribe",
        words: bool = False,
        subtitles: SubtitleOptions = READABLE,
    ) -> None:
        self.fmt = fmt
        self.output_dir = output_dir
        self.task = task
        self.words = words
        self.subtitles = subtitles  # the cue layout of srt and vtt
        self.several = False

    def prepare(self, paths: Sequence[str]) -> list[str]:
        """Create the output directory; the output file name of each input, unique even for equal stems."""
        self.several = len(paths) > 1
        if self.output_dir is not None:
            try:
                self.output_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise InvalidRequest(f"cannot create the output directory {self.output_dir}: {exc.strerror}") from exc
        stems = [Path(p).stem if p != "-" else "stdin" for p in paths]
        counts, seen = Counter(stems), Counter[str]()
        used = {stem for stem, count in counts.items() if count == 1}
        names = []
        for stem in stems:
            if counts[stem] == 1:
                names.append(stem)
                continue
            # a/talk.wav and b/talk.wav must not overwrite each other: talk-1.txt, talk-2.txt, skipping a
            # name another input has (talk-1.flac keeps talk-1.txt; the two talks get talk-2 and talk-3)
            seen[stem] += 1
            while f"{stem}-{seen[stem]}" in used:
                seen[stem] += 1
            used.add(name := f"{stem}-{seen[stem]}")
            names.append(name)
        return [name + EXTENSIONS[self.fmt] for name in names]

    def write(self, path: str, name: str, transcript: Transcript) -> None:
        """Emit one input's transcript; `name` is its file name under the output directory."""
        if self.output_dir is not None:
            target = self.output_dir / name
            target.write_text(self.render_file(transcript), encoding="utf-8")
            print(target, flush=True)
        else:
            print(self.render_stdout(path, transcript), flush=True)

    def render_file(self, transcript: Transcript) -> str:
        if self.fmt in ("json", "verbose_json"):
            return json.dumps(self._json(transcript), ensure_ascii=False, indent=2) + "\n"
        return self._plain(transcript)

    def render_stdout(self, path: str, transcript: Transcript) -> str:
        if self.fmt in ("json", "verbose_json"):
            head = {"file": shown(path)} if self.several else {}
            return json.dumps(head | self._json(transcript), ensure_ascii=False)
        if self.fmt == "text":
            return _one_line(transcript.text)
        block = self._plain(transcript).rstrip("\n")
        return f"==> {path} <==\n{block}\n" if self.several else block

    def _json(self, transcript: Transcript) -> dict[str, Any]:
        if self.fmt == "verbose_json":
            return as_verbose_json(transcript, task=self.task, words=self.words)
        return as_json(transcript)

    def _plain(self, transcript: Transcript) -> str:
        if self.fmt == "srt":
            return as_srt(transcript, self.subtitles)
        if self.fmt == "vtt":
            return as_vtt(transcript, self.subtitles)
        return transcript.text.strip() + "\n"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def shown(path: str | Path) -> str:
    """A path as text that any output encoding can carry: bytes of a name that are not UTF-8 (os.fsdecode
    keeps them as lone surrogates, which a UTF-8 writer refuses) as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")
