"""Shell completion: qimg's own protocol between the shell scripts and the program.

The scripts in completions/ call the program with `_QIMG_COMPLETE=<shell>_complete`,
COMP_WORDS and COMP_CWORD set, and read one candidate per record. Click's
built-in completers changed that protocol between releases (fish answered
"type,value" in 8.1-8.3 and 8.4.2+, "type\\nvalue\\nhelp" in 8.4.0-8.4.1; zsh
values gained colon escapes in 8.5), so a script written by one Click breaks
with another. qimg registers its own completers for bash, zsh and fish, with
the scripts and the record format fixed here, and uses only the parts of
Click's ShellComplete API that are stable across click>=8.1 (the
constructor, get_completions, complete, source, source_vars).

`_QIMG_COMPLETE=<shell>_source qimg` prints the script; completions/qimg.<shell>
is that output.
"""

from __future__ import annotations

import os
import shlex

from click.shell_completion import CompletionItem, ShellComplete, add_completion_class

# Records: bash "type,value" per line; zsh "type\nvalue\nhelp" ("_": no help);
# fish "type,value[\thelp]" per line. type is plain, file or dir.
_BASH = """\
%(complete_func)s() {
    local IFS=$'\\n'
    local response

    response=$(env COMP_WORDS="${COMP_WORDS[*]}" COMP_CWORD=$COMP_CWORD \
%(complete_var)s=bash_complete $1)

    for completion in $response; do
        IFS=',' read type value <<< "$completion"

        if [[ $type == 'dir' ]]; then
            COMPREPLY=()
            compopt -o dirnames
        elif [[ $type == 'file' ]]; then
            COMPREPLY=()
            compopt -o default
        elif [[ $type == 'plain' ]]; then
            COMPREPLY+=($value)
        fi
    done

    return 0
}

%(complete_func)s_setup() {
    complete -o nosort -F %(complete_func)s %(prog_name)s
}

%(complete_func)s_setup;
"""

_ZSH = """\
#compdef %(prog_name)s

%(complete_func)s() {
    local -a completions
    local -a completions_with_descriptions
    local -a response
    (( ! $+commands[%(prog_name)s] )) && return 1

    response=("${(@f)$(env COMP_WORDS="${words[*]}" COMP_CWORD=$((CURRENT-1)) \
%(complete_var)s=zsh_complete %(prog_name)s)}")

    for type key descr in ${response}; do
        if [[ "$type" == "plain" ]]; then
            if [[ "$descr" == "_" ]]; then
                completions+=("$key")
            else
                completions_with_descriptions+=("$key":"$descr")
            fi
        elif [[ "$type" == "dir" ]]; then
            _path_files -/
        elif [[ "$type" == "file" ]]; then
            _path_files -f
        fi
    done

    if [ -n "$completions_with_descriptions" ]; then
        _describe -V unsorted completions_with_descriptions -U
    fi

    if [ -n "$completions" ]; then
        compadd -U -V unsorted -a completions
    fi
}

if [[ $zsh_eval_context[-1] == loadautofunc ]]; then
    # autoload from fpath, call function directly
    %(complete_func)s "$@"
else
    # eval/source/. command, register function for later
    compdef %(complete_func)s %(prog_name)s
fi
"""

_FISH = """\
function %(complete_func)s
    set -l response (env %(complete_var)s=fish_complete COMP_WORDS=(commandline -cp) \
COMP_CWORD=(commandline -t) %(prog_name)s)

    for completion in $response
        set -l metadata (string split -m 1 "," $completion)

        if test "$metadata[1]" = "dir"
            __fish_complete_directories $metadata[2]
        else if test "$metadata[1]" = "file"
            __fish_complete_path $metadata[2]
        else if test "$metadata[1]" = "plain"
            echo $metadata[2]
        end
    end
end

complete --no-files --command %(prog_name)s --arguments "(%(complete_func)s)"
"""


def split_words(text: str) -> list[str]:
    """shlex.split that keeps an unterminated last word (the one being typed)."""
    lex = shlex.shlex(text, posix=True)
    lex.whitespace_split = True
    lex.commenters = ""
    words: list[str] = []
    try:
        words.extend(lex)
    except ValueError:  # an open quote or a trailing backslash
        words.append(lex.token)
    return words


class _QimgComplete(ShellComplete):
    """Candidates from Click's command tree; a file name where Click has none
    (image names are plain string arguments)."""

    def get_completions(self, args: list[str], incomplete: str) -> list[CompletionItem]:
        items = super().get_completions(args, incomplete)
        if not items and not incomplete.startswith("-"):
            items = [CompletionItem(incomplete, type="file")]
        return items

    def get_completion_args(self) -> tuple[list[str], str]:
        words = split_words(os.environ.get("COMP_WORDS", ""))
        cword = int(os.environ.get("COMP_CWORD", "0") or 0)
        incomplete = words[cword] if cword < len(words) else ""
        return words[1:cword], incomplete


class BashComplete(_QimgComplete):
    name = "bash"
    source_template = _BASH

    def format_completion(self, item: CompletionItem) -> str:
        return f"{item.type},{item.value}"


class ZshComplete(_QimgComplete):
    name = "zsh"
    source_template = _ZSH

    def format_completion(self, item: CompletionItem) -> str:
        # _describe splits value from help at the first unescaped colon;
        # compadd (no help) takes the value as it is.
        help_text = (item.help or "").replace("\n", " ") or "_"
        value = item.value.replace(":", "\\:") if help_text != "_" else item.value
        return f"{item.type}\n{value}\n{help_text}"


class FishComplete(_QimgComplete):
    name = "fish"
    source_template = _FISH

    def get_completion_args(self) -> tuple[list[str], str]:
        # COMP_WORDS is the command line up to the cursor, COMP_CWORD the
        # word under it (also the last word of COMP_WORDS when not empty).
        words = split_words(os.environ.get("COMP_WORDS", ""))
        token = split_words(os.environ.get("COMP_CWORD", ""))
        incomplete = token[0] if token else ""
        args = words[1:]
        if incomplete and args and args[-1] == incomplete:
            args.pop()
        return args, incomplete

    def format_completion(self, item: CompletionItem) -> str:
        if item.help:
            help_text = item.help.replace("\n", " ").replace("\t", " ")
            return f"{item.type},{item.value}\t{help_text}"
        return f"{item.type},{item.value}"


def register() -> None:
    """Make Click use qimg's completers for bash, zsh and fish."""
    for cls in (BashComplete, ZshComplete, FishComplete):
        add_completion_class(cls)
