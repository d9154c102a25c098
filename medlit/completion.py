"""``--print_completion bash|zsh``: the shell completion script of a medlit command.

jsonargparse writes the script with shtab from the command's parser (every option of the
trainer, the tasks and the data modules, with their choices), but its own
``--print_completion shtab-bash`` does not work for medlit, for two reasons:

- Its expansion of ``--trainer.strategy`` follows torch's ``DeviceMesh`` into ``Tensor``,
  whose signature names ``Tensor`` again, until Python's recursion limit (jsonargparse
  4.53): 4,000 options named ``--trainer.strategy.device_mesh._rank_map.tensor.tensor...``,
  a 19 MB script written in 30 s. Here that option completes Lightning's strategy names.
- The script registers its function for the command ``python -m medlit.fit``, that is for
  ``python`` itself, so every Python command would be completed with medlit's options.
  Here ``python`` and ``python3`` get a completer that hands ``python -m medlit.<command>``
  to the command's function and anything else to the shell's file-name completion (zsh:
  to the completer ``python`` had). Several medlit scripts can be sourced side by side.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

SHELLS = ("bash", "zsh")

# {module} is medlit.fit, {function} shtab's function for its parser.
_BASH = """
# medlit: `python -m {module} ...` (python, python3, .venv/bin/python) completes here;
# other python commands complete file names.
declare -gA _medlit_completers 2>/dev/null
_medlit_completers[{module}]={function}
_medlit_python() {{
  local module="${{COMP_WORDS[2]-}}" function=""
  [[ -n "$module" ]] && function="${{_medlit_completers[$module]-}}"
  if [[ "${{COMP_WORDS[1]-}}" == -m && -n "$function" && $COMP_CWORD -gt 2 ]]; then
    "$function"
  else
    compopt -o default 2>/dev/null
    COMPREPLY=()
  fi
}}
complete -F _medlit_python python python3
"""

_ZSH = """
# medlit: `python -m {module} ...` (python, python3, .venv/bin/python) completes here;
# other python commands complete as they did before.
typeset -gA _medlit_completers
_medlit_completers[{module}]={function}
[[ ${{_comps[python]-}} != _medlit_python ]] && typeset -g _medlit_python_before=${{_comps[python]-}}
_medlit_python() {{
  local function=${{_medlit_completers[${{words[3]-}}]-}}
  if [[ ${{words[2]-}} == -m && -n $function && CURRENT -gt 3 ]]; then
    words=("${{words[3]}}" "${{(@)words[4,-1]}}")
    (( CURRENT -= 2 ))
    $function
  else
    ${{_medlit_python_before:-_files}}
  fi
}}
compdef _medlit_python python python3
"""


def script(parser: Any, shell: str) -> str:
    """The completion script of ``parser`` (a jsonargparse parser whose ``prog`` is
    ``python -m medlit.<command>``) for ``shell``. The parser cannot parse afterwards:
    jsonargparse adds the completion-only options to it."""
    from pytorch_lightning.strategies import StrategyRegistry

    # argparse has no public look-up of an action by its option string.
    strategy = parser._option_string_actions.get("--trainer.strategy")
    if strategy is not None:  # choices stop jsonargparse's expansion (module docstring)
        strategy.choices = ["auto", *StrategyRegistry.available_strategies()]
    # One word: shtab's zsh script puts the name in a `case` pattern, where spaces break it.
    module = parser.prog = parser.prog.split()[-1]
    function = "_shtab_" + re.sub(r"\W", "_", module)
    text = parser.get_completion_script(f"shtab-{shell}")
    if shell == "bash":  # shtab's `complete ... medlit.fit`
        text = re.sub(r"^complete .*$", "", text, flags=re.MULTILINE)
        return text.rstrip() + "\n" + _BASH.format(module=module, function=function)
    # shtab's `#compdef medlit.fit` and its compdef/call at the end
    text = re.sub(r"^#compdef .*$", "", text, count=1, flags=re.MULTILINE)
    # and its usage note (copy the script to a file named after the command: not one here)
    text = re.sub(r"^# Usage:\n(#.*\n)*", "", text, flags=re.MULTILINE)
    end = text.rfind("if [[ $zsh_eval_context")
    text = text[:end] if end >= 0 else text
    return text.rstrip() + "\n" + _ZSH.format(module=module, function=function)


class PrintCompletion(argparse.Action):
    """``--print_completion SHELL``: print :func:`script` and exit, as ``--help`` does."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        kwargs.pop("default", None)
        super().__init__(
            option_strings,
            dest=argparse.SUPPRESS,
            default=argparse.SUPPRESS,
            choices=SHELLS,
            help="print the shell completion script and exit (README: shell completion)",
            **kwargs,
        )

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
        print(script(parser, values))
        # jsonargparse has spent the parser on the script: its own exit would refuse.
        argparse.ArgumentParser.exit(parser, 0)
