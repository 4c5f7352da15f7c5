"""Chat prompt templates (seed import path: `from accessory.data.conversation import default_conversation`)."""

from .lib import Conversation, ConversationTemplate, SeparatorStyle, conv_templates, default_conversation

__all__ = ["Conversation", "ConversationTemplate", "SeparatorStyle", "conv_templates", "default_conversation"]
