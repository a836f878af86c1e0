from modules.policy.backbone import EncodedPrompts, VLMBackbone
from modules.policy.hf_vlm import HFVisionLanguageBackbone
from modules.policy.openvla import OFTOpenVLABackbone, OpenVLABackbone
from modules.policy.tiny_llava import TinyLlava
from modules.policy.token_vla import PolicyOutput, TokenVLAPolicy

__all__ = ["EncodedPrompts", "VLMBackbone", "HFVisionLanguageBackbone", "OFTOpenVLABackbone", "OpenVLABackbone", "TinyLlava",
           "PolicyOutput", "TokenVLAPolicy"]
