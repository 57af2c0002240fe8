"""The provenance gate's policy tables, each row with the clause it rests on.

Sources were read in November 2026 from stored copies of the documents. Terms change: a row
quotes the clause as it read then and names the document, so that a reader can check it again.
Where only a secondary source's quotation was available, the citation says so.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# Upstream datasets and the models that wrote them are a table of their own.
from .known_datasets import KNOWN_DATASETS, KnownDataset, known_dataset  # noqa: F401


@dataclass(frozen=True)
class ClosedApi:
    key: str
    provider: str
    owners: tuple  # repo-id owners that mean the provider's API (e.g. "openai/gpt-4o")
    patterns: tuple  # full-match regexes over lower-case model names, without the owner
    mention: re.Pattern  # names in free text (dataset cards)
    citation: str


# Model-name patterns are deliberately narrow: gpt2, gpt-j, gpt-neox, gpt-oss (OpenAI's own
# Apache-2.0 weights), gpt4all, gpt4-x-alpaca (a LLaMA fine-tune) and gemma are open weights.
_DATE = r"(-\d{4}(-\d\d-\d\d)?|-\d{8})?"
CLOSED_APIS = (
    ClosedApi(
        "openai", "OpenAI", ("openai", "azure", "azure-openai", "openrouter"),
        (r"gpt-?(3\.5|35)(-turbo)?(-(instruct|16k|\d{4}))*" + _DATE,
         r"gpt-?4(o|\.\d+|\.5)?(-(turbo|mini|nano|vision|preview|32k|\d{4}|audio|realtime|search))*(-preview)?" + _DATE,
         r"gpt-?5(\.\d+)?(-(mini|nano|pro|codex|chat|latest))*" + _DATE,
         r"chatgpt(-4o)?(-latest)?", r"o[134](-(mini|pro|preview|deep-research))*" + _DATE,
         r"(text|code)-davinci-00[1-3]", r"text-(curie|babbage|ada)-001", r"davinci-00[23]"),
        re.compile(r"\b(openai|chatgpt|gpt-?3\.5(-turbo)?|gpt-?4o?|gpt-?4\.1|gpt-?5|text-davinci-00\d)\b", re.I),
        "OpenAI Terms of Use (openai.com/policies/terms-of-use, Jan 2024), \"What you cannot do\": "
        "\"Use Output to develop models that compete with OpenAI.\" (2023 version §2(c)(iii): \"use output "
        "from the Services to develop models that compete with OpenAI\"). The API's Services Agreement "
        "(openai.com/policies/services-agreement) has the same restriction for business customers"),
    ClosedApi(
        "anthropic", "Anthropic", ("anthropic", "openrouter", "bedrock", "aws"),
        (r"claude(-?\d(\.\d)?)?(-(instant|opus|sonnet|haiku|latest|\d(\.\d)?|\d-\d|v\d(:\d)?))*" + _DATE,
         r"anthropic\.claude.*"),
        re.compile(r"\b(anthropic|claude)\b", re.I),
        "Anthropic Commercial Terms of Service (anthropic.com/legal/commercial-terms) §D.4: \"Customer may "
        "not and must not attempt to (a) access the Services to build a competing product or service, "
        "including to train competing AI models\"; Consumer Terms (anthropic.com/legal/consumer-terms) §3: "
        "not \"to develop or train any artificial intelligence or machine learning algorithms or models\"; "
        "support.claude.com article 12326764: \"Our Terms do not allow the use of Outputs to train models "
        "that are competitive with Anthropic's own.\""),
    ClosedApi(
        "google", "Google (Gemini API)", ("google", "gemini", "vertex", "openrouter", "google-deepmind", "models"),
        (r"gemini(-(\d(\.\d)?|pro|ultra|nano|flash|lite|exp|vision|thinking|latest|\d{3}|\d{4}))*" + _DATE,
         r"bard", r"palm-?2", r"(text|chat)-bison(-\d{3})?(-32k)?"),
        re.compile(r"\b(gemini(?!-?\s?embedding)|bard|palm ?2)\b", re.I),
        "Gemini API Additional Terms of Service (ai.google.dev/gemini-api/terms), \"Use Restrictions\": "
        "\"You may not use the Services to develop models that compete with the Services (e.g., Gemini API "
        "or Google AI Studio)\""),
    ClosedApi(
        "xai", "xAI", ("xai", "x-ai", "openrouter"),
        (r"grok-?([2-9](\.\d)?)(-(beta|mini|vision|fast|code|latest|heavy|\d{4}))*" + _DATE, r"grok-beta"),
        re.compile(r"\bgrok-?[2-9]\b|\bx\.ai\b", re.I),
        "xAI Terms of Service (x.ai/legal/terms-of-service; enterprise: x.ai/legal/terms-of-service-enterprise"
        "), prohibited uses: \"Using the Service or any Output to develop models or services that compete "
        "with xAI, scraping or reselling any Input or Output, or distilling model data\" (wording as quoted "
        "by secondary sources; check the live page)"),
    ClosedApi(
        "amazon", "Amazon (Bedrock first-party models)", ("amazon", "aws", "bedrock"),
        (r"amazon\.(titan|nova)-.*", r"(titan|nova)-(text|lite|micro|pro|premier|express)(-.*)?"),
        re.compile(r"\bamazon (titan|nova)\b", re.I),
        "AWS Service Terms (aws.amazon.com/service-terms), Amazon Bedrock: \"You may not use the Services to "
        "develop foundation models or other large scale models that compete with Amazon Bedrock or any other "
        "AWS Service.\" (wording as quoted by secondary sources; check the live page)"),
)

@dataclass(frozen=True)
class LicenseRule:
    verdict: str  # allow | warn | block: for training another model on outputs of (or data under) it
    summary: str
    citation: str
    conditions: tuple = ()


_PERMISSIVE = LicenseRule("allow", "a permissive license: outputs and derivatives may train other models", "")
_LLAMA_31 = ("Llama 3.1 Community License (llama.com/llama3_1/license) §1.b.i: \"If you use the Llama Materials "
             "or any outputs or results of the Llama Materials to create, train, fine tune, or otherwise improve "
             "an AI model, which is distributed or made available, you shall also include 'Llama' at the "
             "beginning of any such AI model name\"")
_LLAMA_31_CONDITIONS = ('name must begin with "Llama" (applied at export)',
                        'display "Built with Llama" where you distribute the model',
                        "the Llama Acceptable Use Policy applies to the student")
_RAIL = LicenseRule("warn", "a RAIL license: models trained on it inherit its use restrictions",
                    "BigScience OpenRAIL-M (bigscience.huggingface.co/blog/bigscience-openrail-m) §4: the use-based "
                    "restrictions of Attachment A must be included \"as an enforceable provision\" in any agreement "
                    "governing the use or distribution of the Model and its Derivatives",
                    ("pass on the license's use restrictions (Attachment A) with the student",))
_NC = LicenseRule("warn", "a non-commercial license", "Creative Commons BY-NC 4.0 (creativecommons.org/licenses/"
                  "by-nc/4.0/legalcode) §2.a.1: the rights are granted \"for NonCommercial purposes only\"",
                  ("non-commercial use only: no commercial use of the student", "attribute the source"))

LICENSES = {
    **{k: _PERMISSIVE for k in ("apache-2.0", "mit", "bsd-2-clause", "bsd-3-clause", "cc0-1.0", "unlicense",
                                "odc-by", "pddl", "cdla-permissive-2.0", "bsd")},
    "cc-by-4.0": LicenseRule("allow", "CC BY 4.0: reuse with attribution",
                             "Creative Commons BY 4.0 (creativecommons.org/licenses/by/4.0/legalcode) §3.a: "
                             "attribution is required when Shared", ("attribute the source when you share",)),
    "cc-by-sa-4.0": LicenseRule("warn", "CC BY-SA 4.0: adapted material must carry the same license",
                                "Creative Commons BY-SA 4.0 (creativecommons.org/licenses/by-sa/4.0/legalcode) "
                                "§3.b: Adapted Material must be shared under the same or a compatible license",
                                ("attribute the source", "share adapted material under CC BY-SA 4.0")),
    "cc-by-sa-3.0": LicenseRule("warn", "CC BY-SA 3.0: adaptations must carry the same license",
                                "Creative Commons BY-SA 3.0 (creativecommons.org/licenses/by-sa/3.0/legalcode) "
                                "§4(b): an Adaptation may be distributed only under this License, a later version "
                                "with the same License Elements, or a compatible license",
                                ("attribute the source", "share adapted material under CC BY-SA 3.0 or later")),
    "cc-by-nc-4.0": _NC, "cc-by-nc-sa-4.0": _NC, "cc-by-nc-nd-4.0": _NC, "cc-by-nc-2.0": _NC,
    "llama2": LicenseRule("block", "Llama 2's outputs may not improve any other large language model",
                          "Llama 2 Community License (ai.meta.com/llama/license) §1.b.v: \"You will not use the "
                          "Llama Materials or any output or results of the Llama Materials to improve any other "
                          "large language model (excluding Llama 2 or derivative works thereof)\""),
    "llama3": LicenseRule("block", "Llama 3's outputs may not improve any other large language model",
                          "Meta Llama 3 Community License (llama.com/llama3/license) §1.b.v: \"You will not use "
                          "the Llama Materials or any output or results of the Llama Materials to improve any other "
                          "large language model (excluding Meta Llama 3 or derivative works thereof)\""),
    "llama3.1": LicenseRule("warn", "Llama 3.1 allows training other models on its outputs, with conditions",
                            _LLAMA_31, _LLAMA_31_CONDITIONS),
    "llama3.2": LicenseRule("warn", "Llama 3.2 allows training other models on its outputs, with conditions",
                            _LLAMA_31.replace("3.1 Community License (llama.com/llama3_1/license)",
                                              "3.2 Community License (llama.com/llama3_2/license)"),
                            _LLAMA_31_CONDITIONS),
    "llama3.3": LicenseRule("warn", "Llama 3.3 allows training other models on its outputs, with conditions",
                            _LLAMA_31.replace("3.1 Community License (llama.com/llama3_1/license)",
                                              "3.3 Community License (llama.com/llama3_3/license)"),
                            _LLAMA_31_CONDITIONS),
    "llama4": LicenseRule("warn", "Llama 4 allows training other models on its outputs, with conditions",
                          _LLAMA_31.replace("3.1 Community License (llama.com/llama3_1/license)",
                                            "4 Community License (llama.com/llama4/license)"),
                          _LLAMA_31_CONDITIONS),
    "gemma": LicenseRule("warn", "a model trained on Gemma's outputs is a Model Derivative under the Gemma Terms",
                         "Gemma Terms of Use (ai.google.dev/gemma/terms) §1.1(e): Model Derivatives include models "
                         "created by transfer of patterns of the \"Output of Gemma ... including distillation "
                         "methods\"; §3.1: \"You must include the use restrictions referenced in Section 3.2 as an "
                         "enforceable provision in any agreement\" governing Model Derivatives",
                         ("the student is a Gemma Model Derivative: pass on the Gemma Terms' use restrictions "
                          "and Prohibited Use Policy",)),
    "tongyi-qianwen": LicenseRule("block", "Qwen's original license forbids improving other models with its "
                                  "outputs", "Tongyi Qianwen License Agreement (github.com/QwenLM/Qwen/blob/main/"
                                  "LICENSE, 2023-08-03) §5.b: \"You can not use the Materials or any output "
                                  "therefrom to improve any other large language model (excluding Tongyi Qianwen or "
                                  "derivative works thereof).\""),
    "qwen": LicenseRule("warn", "the Qwen license allows training other models on outputs, with attribution",
                        "Qwen License Agreement (e.g. huggingface.co/Qwen/Qwen2.5-72B-Instruct/blob/main/LICENSE) "
                        "§4.b: if you use the Materials or outputs \"to create, train, fine-tune, or improve an AI "
                        "model that is distributed or made available, you shall prominently display 'Built with "
                        "Qwen' or 'Improved using Qwen' in the related product documentation\"",
                        ('display "Built with Qwen" or "Improved using Qwen" in the student\'s documentation',)),
    "qwen-research": LicenseRule("warn", "the Qwen Research License allows non-commercial research use only",
                                 "Qwen Research License Agreement (e.g. huggingface.co/Qwen/Qwen2.5-3B/blob/main/"
                                 "LICENSE) §2.a: rights are granted \"FOR NON-COMMERCIAL PURPOSES ONLY\"; §4.b: "
                                 "models trained on outputs display \"Built with Qwen\" or \"Improved using "
                                 "Qwen\"",
                                 ("non-commercial research use only", 'display "Built with Qwen"')),
    "mrl": LicenseRule("warn", "the Mistral Research License allows research use only",
                       "Mistral AI Research License (mistral.ai/licenses/MRL-0.1.md) §3.2: \"You shall only "
                       "use the Mistral Models, Derivatives (whether or not created by Mistral AI) and Outputs for "
                       "Research Purposes.\"; §4.2: \"Any Outputs shall be subject to the restrictions set out in "
                       "Section 3\"",
                       ("research use only: no commercial or production use of the student",)),
    "deepseek": LicenseRule("warn", "the DeepSeek License passes its use restrictions on to derivatives",
                            "DeepSeek License Agreement v1.0 (github.com/deepseek-ai/DeepSeek-V3/blob/main/"
                            "LICENSE-MODEL): \"Derivatives of the Model\" include models trained with \"synthetic "
                            "data by the Model\"; §4.a: \"Use-based restrictions as referenced in paragraph 5 MUST "
                            "be included as an enforceable provision\" in agreements governing them",
                            ("pass on the DeepSeek License's use restrictions (Attachment A) with the student",)),
    "mnpl": LicenseRule("warn", "the Mistral Non-Production License allows non-production use only",
                        "Mistral AI Non-Production License (mistral.ai/licenses/MNPL-0.1.md): no production or "
                        "commercial use of the models, their derivatives or outputs (not checked against a stored "
                        "copy)", ("non-production use only",)),
    "deepseek-api": LicenseRule("allow", "DeepSeek's platform terms allow training other models on outputs",
                                "DeepSeek Open Platform Terms of Service, Inputs and Outputs: outputs may be used for "
                                "\"training other models (such as model distillation)\" (as quoted by secondary "
                                "sources; the R1 release note says the same)"),
    **{k: _RAIL for k in ("openrail", "openrail++", "bigscience-openrail-m", "creativeml-openrail-m",
                          "bigscience-bloom-rail-1.0", "bigcode-openrail-m")},
}

# Open-weight families whose name fixes their license (used only when no card says otherwise).
OPEN_FAMILIES = (
    (r"(meta-)?llama-?2.*", "llama2"),
    (r"(meta-)?llama-?3\.1.*", "llama3.1"), (r"(meta-)?llama-?3\.2.*", "llama3.2"),
    (r"(meta-)?llama-?3\.3.*", "llama3.3"), (r"(meta-)?llama-?4.*", "llama4"),
    (r"(meta-)?llama-?3(-.*)?", "llama3"),
    (r"gemma.*", "gemma"), (r"codegemma.*", "gemma"),
    (r"(mistral-7b|mistral-nemo|mixtral-8x(7|22)b|mathstral|codestral-mamba).*", "apache-2.0"),
    (r"mistral-large.*", "mrl"),
    (r"phi-?[1-4].*", "mit"), (r"qwen3.*", "apache-2.0"), (r"qwen-(7b|14b|72b).*", "tongyi-qianwen"),
    (r"deepseek-r1.*", "mit"), (r"deepseek-(chat|reasoner)", "deepseek-api"),
    (r"(c4ai-command-r|aya-).*", "cc-by-nc-4.0"), (r"openchat.*", "apache-2.0"), (r"grok-1", "apache-2.0"),
    (r"gpt-oss.*", "apache-2.0"), (r"gpt2.*", "mit"),
    (r"(gpt-j|gpt-neox?|pythia|olmo|smollm\d?|tinyllama|falcon-mamba).*", "apache-2.0"),
)
