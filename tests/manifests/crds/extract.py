"""Extract the v1 openAPIV3Schema of every CRD under SHARED/{kuberay,monitoring}-crds."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
FOLDERS = ("kuberay-crds", "monitoring-crds")


def extract(crd_file: Path, folder: str) -> dict:
    raw = crd_file.read_bytes()
    crd = yaml.load(raw, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return {
        "group": crd["spec"]["group"],
        "kind": crd["spec"]["names"]["kind"],
        "version": "v1",
        "source": f"{folder}/{crd_file.name}",
        "source_sha256": hashlib.sha256(raw).hexdigest(),
        "openAPIV3Schema": v1["schema"]["openAPIV3Schema"],
    }


def dumps(doc: dict) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def main(shared: Path) -> None:
    for folder in FOLDERS:
        for f in sorted((shared / folder).glob("*.yaml")):
            (HERE / f"{f.stem}.v1.json").write_text(dumps(extract(f, folder)))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
