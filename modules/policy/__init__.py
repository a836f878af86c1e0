from modules.policy.backbone import EncodedPrompts, VLMBackbone
from modules.policy.tiny_llava import TinyLlava
from modules.policy.token_vla import PolicyOutput, TokenVLAPolicy

__all__ = ["EncodedPrompts", "VLMBackbone", "TinyLlava", "PolicyOutput", "TokenVLAPolicy"]
