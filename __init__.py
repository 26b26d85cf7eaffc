"""kiln: serve Hugging Face models through a compiler, with vLLM's API.

    from kiln import LLM, SamplingParams
"""

from kiln.runtime.llm import LLM
from kiln.runtime.outputs import CompletionOutput, Logprob, RequestOutput
from kiln.runtime.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "__version__"]
