"""The kit's own OpenVLA ("Prismatic") implementation on transformers parts, and its checkpoint
loader. The kit does not run the checkpoint's remote code (``trust_remote_code``): that code
pins old transformers versions and would execute whatever a checkpoint folder ships."""
from modules.policy.openvla.backbone import OpenVLABackbone
from modules.policy.openvla.checkpoint import load_checkpoint
from modules.policy.openvla.config import PrismaticConfig, TowerSpec
from modules.policy.openvla.modeling import PrismaticForActionPrediction, PrismaticModel
from modules.policy.openvla.oft_backbone import OFTOpenVLABackbone
from modules.policy.openvla.tokenizer import llama_layout_tokenizer

__all__ = ["OFTOpenVLABackbone", "OpenVLABackbone", "PrismaticConfig", "PrismaticForActionPrediction", "PrismaticModel", "TowerSpec",
           "llama_layout_tokenizer", "load_checkpoint"]
