"""The expanded model's HF classes (these files are also copied into every saved checkpoint).

Importing this package registers them with the Auto classes, so the project's own code never needs
``trust_remote_code`` for its checkpoints.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from pipeline.hf_modeling.configuration_layermoe import LayerMoEConfig
from pipeline.hf_modeling.modeling_layermoe import LayerMoEForCausalLM

AutoConfig.register("layermoe", LayerMoEConfig, exist_ok=True)
AutoModelForCausalLM.register(LayerMoEConfig, LayerMoEForCausalLM, exist_ok=True)
