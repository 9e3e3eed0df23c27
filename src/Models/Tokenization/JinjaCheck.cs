namespace LoRAHub.Models.Tokenization;

/// <summary>
/// A structural check of a Jinja chat_template: every <c>{{</c>, <c>{%</c>, <c>{#</c> is closed, and block tags
/// (for, if, macro, ...) are balanced with their end tags. LoRAHub does not interpret the template (see
/// <see cref="ChatTemplate.Guess"/>), but a broken one means the file is damaged, and transformers would refuse it too.
/// </summary>
internal static class JinjaCheck
{
    // Tags that open a block closed by end<tag>; "set" only in its block form (no "=").
    private static readonly HashSet<string> BlockTags = ["for", "if", "macro", "call", "filter", "set", "generation", "block", "with", "autoescape"];

    /// <summary>Throws a FormatException naming <paramref name="name"/> and the line and column of the first fault.</summary>
    public static void Check(string jinja, string name)
    {
        var blocks = new Stack<(string tag, int at)>();
        var i = 0;
        while (i < jinja.Length)
        {
            var open = jinja.IndexOf('{', i);
            if (open < 0 || open + 1 >= jinja.Length) break;
            var kind = jinja[open + 1];
            var close = kind switch { '{' => "}}", '%' => "%}", '#' => "#}", _ => null };
            if (close is null)
            {
                i = open + 1;
                continue;
            }
            var end = kind == '#' ? jinja.IndexOf("#}", open + 2, StringComparison.Ordinal) : FindClose(jinja, open + 2, close);
            if (end < 0) throw Fault(jinja, name, open, $"'{{{kind}' is never closed with '{close}'");
            i = end + 2;
            if (kind != '%') continue;

            var body = jinja[(open + 2)..end].Trim().Trim('-', '+').Trim();
            var tag = new string(body.TakeWhile(char.IsLetter).ToArray());
            if (tag == "raw")
            {
                // Everything up to {% endraw %} is text.
                var endRaw = System.Text.RegularExpressions.Regex.Match(jinja[i..], @"\{%[-+]?\s*endraw\s*[-+]?%\}");
                if (!endRaw.Success) throw Fault(jinja, name, open, "'{% raw %}' is never closed with '{% endraw %}'");
                i += endRaw.Index + endRaw.Length;
            }
            else if (BlockTags.Contains(tag) && !(tag == "set" && body.Contains('=')))
                blocks.Push((tag, open));
            else if (tag.StartsWith("end", StringComparison.Ordinal) && BlockTags.Contains(tag[3..]))
            {
                if (blocks.Count == 0) throw Fault(jinja, name, open, $"'{{% {tag} %}}' closes no '{{% {tag[3..]} %}}'");
                var (opened, at) = blocks.Pop();
                if (opened != tag[3..])
                    throw Fault(jinja, name, open, $"'{{% {tag} %}}' where '{{% {opened} %}}' ({Position(jinja, at)}) needs '{{% end{opened} %}}'");
            }
            else if (tag is "elif" or "else" && (blocks.Count == 0 || blocks.Peek().tag is not ("if" or "for")))
                throw Fault(jinja, name, open, $"'{{% {tag} %}}' is outside any '{{% if %}}' or '{{% for %}}'");
        }
        if (blocks.Count > 0)
        {
            var (tag, at) = blocks.Peek();
            throw Fault(jinja, name, at, $"'{{% {tag} %}}' is never closed with '{{% end{tag} %}}'");
        }
    }

    // The end of a tag, skipping quoted strings (a '%}' inside '...' does not close it); -1 when it never ends.
    private static int FindClose(string s, int from, string close)
    {
        char? quote = null;
        for (var i = from; i < s.Length; i++)
        {
            var c = s[i];
            if (quote is { } q)
            {
                if (c == '\\') i++;
                else if (c == q) quote = null;
            }
            else if (c is '\'' or '"') quote = c;
            else if (c == close[0] && i + 1 < s.Length && s[i + 1] == close[1]) return i;
        }
        return -1;
    }

    private static FormatException Fault(string jinja, string name, int at, string what) =>
        new($"{name} is not valid Jinja: {what} at {Position(jinja, at)}");

    private static string Position(string s, int at)
    {
        var line = 1 + s.AsSpan(0, at).Count('\n');
        var column = at - (at == 0 ? -1 : s.LastIndexOf('\n', at - 1));
        return $"line {line}, column {column}";
    }
}
