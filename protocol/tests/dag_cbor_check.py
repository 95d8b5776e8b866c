"""Reads documents grid wrote with an independent, strict DAG-CBOR implementation.

Usage: dag_cbor_check.py DIR. DIR holds, for each document NAME, NAME.bin (its bytes) and
NAME.id (grid's id of it); and legacy-*.bin, bytes that are not DAG-CBOR. For each document this
decodes strictly (the `dag-cbor` package refuses unsorted keys, non-shortest integers,
indefinite lengths and foreign tags), re-encodes, checks the re-encoding is the same bytes,
computes the CID (v1, dag-cbor, SHA-1) and checks it is grid's id; it prints one line per
document with the number of links found. Each legacy file must be refused. Exits non-zero, with
the reason, on the first disagreement.
"""

import pathlib
import sys

import dag_cbor
from dag_cbor.decoding import CBORDecodingError
from multiformats import CID, multihash


def links(value):
    if isinstance(value, CID):
        return [value]
    if isinstance(value, dict):
        return [c for v in value.values() for c in links(v)]
    if isinstance(value, list):
        return [c for v in value for c in links(v)]
    return []


def main(root):
    docs = sorted(root.glob("*.id"))
    if not docs:
        sys.exit(f"no documents in {root}")
    for id_file in docs:
        name = id_file.stem
        data = (root / f"{name}.bin").read_bytes()
        want = id_file.read_text().strip()
        value = dag_cbor.decode(data)
        again = dag_cbor.encode(value)
        if again != data:
            sys.exit(f"{name}: re-encoding differs:\n  grid   {data.hex()}\n  python {again.hex()}")
        cid = CID("base32", 1, "dag-cbor", multihash.digest(again, "sha1"))
        if str(cid) != want:
            sys.exit(f"{name}: python computes {cid}, grid says {want}")
        found = links(value)
        print(f"{name} {cid} links={len(found)} codecs={sorted({c.codec.name for c in found})}")
    for legacy in sorted(root.glob("legacy-*.bin")):
        try:
            dag_cbor.decode(legacy.read_bytes())
        except CBORDecodingError as e:
            reason = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
            print(f"{legacy.stem} refused: {reason}")
            continue
        sys.exit(f"{legacy.stem}: a strict decoder accepted bytes that are not DAG-CBOR")


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
