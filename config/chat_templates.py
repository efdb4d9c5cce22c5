"""The chat templates built into the service, as Jinja (what Hugging Face tokenizers render).

`vicuna_v1.1` is FastChat's (SeparatorStyle.ADD_COLON_TWO, sep " ", sep2 "</s>"): the system message
and " ", then "USER: <text> " and "ASSISTANT: <text></s>" per turn, then "ASSISTANT:" for the answer.
`chatml` is ChatML without a default system message."""

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")
VICUNA_V1_1 = (
    "{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
    "{%- set turns = messages[1:] -%}{%- else -%}{%- set system = '" + VICUNA_SYSTEM.replace("'", "\\'") + "' -%}"
    "{%- set turns = messages -%}{%- endif -%}"
    "{{- system + ' ' -}}"
    "{%- for m in turns -%}"
    "{%- if m['role'] == 'user' -%}{{- 'USER: ' + m['content'] + ' ' -}}"
    "{%- elif m['role'] == 'assistant' -%}{{- 'ASSISTANT: ' + m['content'] + '</s>' -}}"
    "{%- else -%}{{- raise_exception('only the first message may be a system message') -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)
CHATML = (
    "{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)
BUILT_IN = {"vicuna_v1.1": VICUNA_V1_1, "chatml": CHATML}
