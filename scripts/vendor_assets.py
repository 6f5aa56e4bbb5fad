"""Refresh or check the console's vendored browser assets (nothing is loaded from a CDN at run time).

    python scripts/vendor_assets.py --check      # every file matches the sha256 in its manifest (offline)
    python scripts/vendor_assets.py --refresh    # download each pinned version from the npm registry again

Each manifest (``vendor.json`` beside the files) names the npm package, its version, the file inside the
package's tarball and the sha256 of the file kept. ``--refresh`` checks the tarball against the registry's
``dist.integrity`` (sha512) before it extracts anything; change a version in a manifest, then refresh, to upgrade.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import sys
import tarfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = [
    ROOT / "src/openmaas/console/static/vendor/vendor.json",
    ROOT / "tests/browser/vendor/vendor.json",
]
REGISTRY = "https://registry.npmjs.org"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check(manifest: Path) -> list[str]:
    problems = []
    for entry in json.loads(manifest.read_text()):
        path = manifest.parent / entry["file"]
        if not path.exists():
            problems.append(f"{path}: missing")
        elif sha256(path.read_bytes()) != entry["sha256"]:
            problems.append(f"{path}: sha256 differs from {manifest.name} ({entry['package']} {entry['version']})")
    return problems


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as r:
        data: bytes = r.read()
    return data


def refresh(manifest: Path) -> None:
    entries = json.loads(manifest.read_text())
    tarballs: dict[tuple[str, str], bytes] = {}
    for entry in entries:
        key = (entry["package"], entry["version"])
        if key not in tarballs:
            meta = json.loads(_get(f"{REGISTRY}/{entry['package']}/{entry['version']}"))
            data = _get(meta["dist"]["tarball"])
            algo, _, want = meta["dist"]["integrity"].partition("-")
            got = base64.b64encode(hashlib.new(algo, data).digest()).decode()
            if got != want:
                raise SystemExit(f"{entry['package']} {entry['version']}: tarball does not match the registry")
            tarballs[key] = data
        with tarfile.open(fileobj=io.BytesIO(tarballs[key])) as tar:
            member = tar.extractfile(f"package/{entry['source']}")
            if member is None:
                raise SystemExit(f"{entry['package']} {entry['version']}: no {entry['source']} in the tarball")
            content = member.read()
        (manifest.parent / entry["file"]).write_bytes(content)
        entry["sha256"] = sha256(content)
        print(f"{entry['file']}: {entry['package']} {entry['version']} ({len(content):,} bytes)")
    manifest.write_text(json.dumps(entries, indent=2) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--check", action="store_true")
    group.add_argument("--refresh", action="store_true")
    args = parser.parse_args()
    if args.refresh:
        for manifest in MANIFESTS:
            refresh(manifest)
        return 0
    problems = [p for m in MANIFESTS for p in check(m)]
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
