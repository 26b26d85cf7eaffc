"""kiln: serve Hugging Face models through a compiler, with vLLM's API.

    from kiln import LLM, SamplingParams
"""

from kiln.runtime.llm import LLM
from kiln.runtime.outputs import (ClassificationRequestOutput, CompletionOutput, EmbeddingRequestOutput, Logprob,
                                  PoolingRequestOutput, RequestOutput, ScoringRequestOutput)
from kiln.runtime.pooling_params import PoolerConfig, PoolingParams
from kiln.runtime.sampling_params import RequestOutputKind, SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutputKind", "PoolingParams", "PoolerConfig", "RequestOutput", "CompletionOutput", "Logprob",
           "PoolingRequestOutput", "EmbeddingRequestOutput", "ClassificationRequestOutput", "ScoringRequestOutput",
           "__version__"]
