"""Checks one overlay's rendered manifests (the flake's `manifests-<overlay>` checks).

Usage: check-manifests.py RENDERED.yaml IMAGE...

Every object must have an apiVersion, a kind and a name, and no object may appear twice.
Every image of ours (a repository whose last two parts are `flash-sale/<name>`) must be one
the flake builds, and every image the flake builds must be run by the overlay.
"""

import sys

import yaml


def image_refs(node):
    """Yields every string value of an `image` key, at any depth."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "image" and isinstance(value, str):
                yield value
            else:
                yield from image_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from image_refs(item)


def repository(ref):
    """`registry/flash-sale/gateway:tag@sha256:...` -> `registry/flash-sale/gateway`."""
    name = ref.split("@", 1)[0]
    head, sep, tail = name.rpartition(":")
    return head if sep and "/" not in tail else name


def main(path, images):
    with open(path, encoding="utf-8") as rendered:
        objects = [doc for doc in yaml.safe_load_all(rendered) if doc is not None]
    errors = []
    seen = set()
    deployed = set()
    for obj in objects:
        meta = obj.get("metadata") or {}
        ident = (obj.get("apiVersion"), obj.get("kind"), meta.get("namespace"), meta.get("name"))
        if not all((ident[0], ident[1], ident[3])):
            errors.append(f"object without apiVersion, kind or name: {ident}")
        if ident in seen:
            errors.append(f"object rendered twice: {ident}")
        seen.add(ident)
        for ref in image_refs(obj):
            parts = repository(ref).split("/")
            if len(parts) >= 2 and parts[-2] == "flash-sale":
                if parts[-1] not in images:
                    errors.append(f"{ident[1]}/{ident[3]} runs {ref}, which the flake does not build")
                deployed.add(parts[-1])
    for image in sorted(set(images) - deployed):
        errors.append(f"no workload runs flash-sale/{image}")
    if not objects:
        errors.append("the overlay renders nothing")
    for error in errors:
        print(f"{path}: {error}", file=sys.stderr)
    print(f"{path}: {len(objects)} objects, images {sorted(deployed)}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
