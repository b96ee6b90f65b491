"""Time and peak RSS of compiling a chat template of about N bytes with transformers' _compile_jinja_template (as
service.runtime.compiled does): `python compile_cost.py N`, one process per size. The template repeats a loop over
the messages with an if/else, as real templates are made of."""
import resource
import sys
import time

from transformers.utils.chat_template_utils import _compile_jinja_template

UNIT = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ '<|im_start|>user\\n' + m['content'] + "
        "'<|im_end|>\\n' }}{% else %}{{ m['content'] | trim }}{% endif %}{% endfor %}\n")
template = UNIT * (int(sys.argv[1]) // len(UNIT))
start = time.perf_counter()
_compile_jinja_template(template)
seconds = time.perf_counter() - start
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
print(len(template.encode()), f"{seconds:.2f} s", peak_mb, "MB peak RSS")
