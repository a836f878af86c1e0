"""The kit's own OpenVLA ("Prismatic") implementation on transformers parts, and its checkpoint
loader (no remote code: specs/OPENVLA.md says why)."""
from modules.policy.openvla.backbone import OpenVLABackbone
from modules.policy.openvla.checkpoint import load_checkpoint
from modules.policy.openvla.config import PrismaticConfig, TowerSpec
from modules.policy.openvla.modeling import PrismaticForActionPrediction, PrismaticModel
from modules.policy.openvla.tokenizer import llama_layout_tokenizer

__all__ = ["OpenVLABackbone", "PrismaticConfig", "PrismaticForActionPrediction", "PrismaticModel", "TowerSpec",
           "llama_layout_tokenizer", "load_checkpoint"]
