"""``hf-hub:<owner>/<repo>[@revision]`` pretrained names: the weight file from the Hugging Face Hub cache.

    model.pretrained=hf-hub:timm/vit_base_patch16_384.augreg_in21k_ft_in1k

is the AugReg ViT-B/16 of the paper (``B_16-i21k-300ep-...-res_384.npz``) as timm publishes it
(safetensors, timm's key names; larvseg.models.pretrained_weights maps them). ``huggingface_hub`` resolves the name:
from its local cache (``$HF_HOME/hub``, or ``$HF_HUB_CACHE``) when the file is there, downloading it
there first when online; with ``HF_HUB_OFFLINE=1`` only the cache is used. Optional dependency:
``pip install "larvseg[hub]"``.
"""

from __future__ import annotations

from pathlib import Path

from larvseg.errors import CheckpointError


class CheckpointLoadError(CheckpointError):
    """A pretrained file that cannot be read or does not fit the backbone; the message names the file
    (a user-facing error: one line, as every unreadable checkpoint)."""

    hint = (
        "check model.pretrained: an AugReg .npz, a timm .safetensors/.pth, hf-hub:<owner>/<repo>, a LarvSeg "
        "checkpoint, or empty for random initialisation"
    )


HF_HUB_PREFIX = "hf-hub:"
AUGREG_HUB_NAME = "hf-hub:timm/vit_base_patch16_384.augreg_in21k_ft_in1k"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's file names, preferred first


def resolve_hf_hub(spec: str) -> Path:
    """Local path of the weight file of ``hf-hub:<repo>[@revision]`` (cached, or downloaded when online).

    Raises CheckpointLoadError naming the repository when huggingface_hub is not installed, the
    repository or revision does not exist, or no weight file is cached while offline."""
    if not spec.startswith(HF_HUB_PREFIX):
        raise CheckpointLoadError(f"{spec}: not an {HF_HUB_PREFIX}<owner>/<repo> name")
    repo_id, _, revision = spec[len(HF_HUB_PREFIX) :].partition("@")
    try:
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as exc:
        raise CheckpointLoadError(f'{spec}: needs huggingface_hub: pip install "larvseg[hub]" ({exc})') from None
    problems = []
    for filename in WEIGHT_FILES:
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision or None))
        except LocalEntryNotFoundError:  # offline (or the Hub unreachable) and not in the cache: try the next name
            problems.append(f"{filename} not in the cache")
        except EntryNotFoundError:  # the repository has no file of this name: try the next name
            problems.append(f"{filename} not in the repository")
        except (HfHubHTTPError, ValueError, OSError) as exc:  # unknown repo/revision, invalid name, network
            raise CheckpointLoadError(f"{spec}: cannot fetch {filename} of {repo_id}: {exc}") from None
    offline = " (HF_HUB_OFFLINE=1: cache only)" if constants.HF_HUB_OFFLINE else ""
    raise CheckpointLoadError(
        f"{spec}: no weights of {repo_id}{'@' + revision if revision else ''} found{offline}: {'; '.join(problems)}. "
        f"Cache: {constants.HF_HUB_CACHE}. Run once with network access, or set HF_HOME to a cache that holds it."
    )
