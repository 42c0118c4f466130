"""The artifact bundle: `BUNDLE/` = artifacts of one or more targets + tokenizer files + `reference/` (the weights
parity's numpy reference runs) + `manifest.json` (contract: shared/docs/DESIGN.md; JSON Schema:
manifest.schema.json). A bundle is self-contained and relocatable: the manifest holds no absolute path.

    manifest.py     write / read / verify manifest.json (sha256 of every file), parity summaries
    tokenizer.py    copy the checkpoint's tokenizer files into a bundle
    reference.py    the reference weights inside the bundle
"""
