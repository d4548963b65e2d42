"""C2PA manifests, signed with the user's certificate chain and key by c2pa-python, after the final encode.

Signing is the last step before the bytes are hashed and written: any re-encode after it would strip
the manifest. The manifest holds the AI-generated assertion (`c2pa.actions`: `c2pa.created` with IPTC
digitalSourceType trainedAlgorithmicMedia) and `org.imagemill.parameters` (the image's published
metadata JSON: prompt, seed, model and its hash, ...; none with `output.embed_parameters: none`).
c2pa's own thumbnail is off: measured, it made a 12 KB PNG 288 KB.

The certificate and key are read by the actor (local path or fsspec URL with the section's storage
options), kept in memory, and never logged or recorded; errors name the setting, not the path or its
content. A manifest carries random salts and a fresh signature, so a signed image's bytes differ from
run to run (its pixels and parameters do not).
"""

from __future__ import annotations

import io
import json
from importlib import metadata
from typing import Any

from imagemill.core.errors import ImagemillError
from imagemill.core.spec import C2paSpec
from imagemill.core.storage import filesystem
from imagemill.provenance import optional_library
from imagemill.provenance.parameters import TRAINED_ALGORITHMIC_MEDIA

MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
PARAMETERS_LABEL = "org.imagemill.parameters"


def _read(url: str, storage_options: dict[str, Any], setting: str) -> bytes:
    try:
        fs, path = filesystem(url, storage_options)
        return fs.cat_file(path)
    except Exception as exc:  # the message may quote the path or an option: say only what failed
        raise ImagemillError(
            f"{setting} could not be read ({type(exc).__name__}); "
            "check the path and output.c2pa.storage_options"
        ) from None


def manifest(title: str, parameters: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest definition: created by a trained model, with the generation parameters if given."""
    software = {"name": "imagemill", "version": metadata.version("imagemill")}
    return {
        "claim_generator_info": [software],
        "title": title,
        "assertions": [
            {
                "label": "c2pa.actions",
                "data": {
                    "actions": [
                        {
                            "action": "c2pa.created",
                            "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                            "softwareAgent": software,
                        }
                    ]
                },
            },
            *([] if parameters is None else [{"label": PARAMETERS_LABEL, "data": parameters}]),
        ],
    }


class C2paSigner:
    """Signs encoded images with the certificate and key of `output.c2pa`; one per actor, used from
    every writer thread (each sign makes its own c2pa Signer and Builder)."""

    def __init__(self, spec: C2paSpec):
        self._c2pa = optional_library("c2pa", "output.c2pa")
        self._cert = _read(spec.cert, spec.storage_options, "output.c2pa.cert")
        self._key = _read(spec.key, spec.storage_options, "output.c2pa.key")
        self._alg = spec.alg
        self._timestamp_url = spec.timestamp_url
        self._settings = {"builder": {"thumbnail": {"enabled": False}}}

    def sign(self, data: bytes, image_format: str, title: str, parameters_json: str | None) -> bytes:
        """`data` (an encoded image) with a signed manifest embedded; `parameters_json`: its parameters
        assertion (None: none)."""
        c2pa = self._c2pa
        info = c2pa.C2paSignerInfo(self._alg, self._cert, self._key, self._timestamp_url)
        context = c2pa.Context(c2pa.Settings.from_dict(self._settings))
        parameters = None if parameters_json is None else json.loads(parameters_json)
        try:
            with (
                c2pa.Signer.from_info(info) as signer,
                c2pa.Builder(manifest(title, parameters), context=context) as builder,
            ):
                signed = io.BytesIO()
                builder.sign(signer, MIME_TYPES[image_format], io.BytesIO(data), signed)
        except c2pa.C2paError as exc:
            raise ImagemillError(
                f"output.c2pa: signing failed ({type(exc).__name__}): the key must match the certificate "
                f"and output.c2pa.alg ({self._alg}), and the chain be a C2PA signing chain (signer first)"
            ) from None
        return signed.getvalue()
