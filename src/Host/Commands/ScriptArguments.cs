using System.CommandLine;

namespace LoRAHub.Host.Commands;

/// <summary>
/// Everything after the script path of <c>run</c> belongs to the script, even tokens that look like host options
/// (<c>run train.csx --lr 3e-4 --device x</c> passes both to the script). The split happens before parsing, so the
/// host's options must come before the script path.
/// </summary>
public static class ScriptArguments
{
    public static (string[] HostArgs, string[] ScriptArgs) Split(RootCommand root, Command run, IReadOnlyList<string> args)
    {
        var command = (Command)root;
        for (var i = 0; i < args.Count; i++)
        {
            var token = args[i];
            if (token.StartsWith('-'))
            {
                if (FindOption(command, token) is { } option && TakesValue(option) && !token.Contains('=') && !token.Contains(':')) i++;
                continue;
            }
            if (command == root && token == run.Name)
            {
                command = run;
                continue;
            }
            // The first positional token: the script path under `run`, or some other command.
            return command == run ? (args.Take(i + 1).ToArray(), args.Skip(i + 1).ToArray()) : (args.ToArray(), []);
        }
        return (args.ToArray(), []);
    }

    /// <summary>
    /// A note when script arguments look like <c>run</c>'s own options (<c>run train.csx --method galore</c>): they go to
    /// the script, which may well want them, but the user more likely meant the host's. The note shows the command with
    /// them before the script. Null when none does.
    /// </summary>
    /// <param name="hostArgs">The arguments up to and including the script path (<see cref="Split"/>'s first part).</param>
    public static string? HostOptionsAfterScript(Command run, IReadOnlyList<string> hostArgs, IReadOnlyList<string> scriptArgs)
    {
        var moved = new List<string>();
        var names = new List<string>();
        var rest = new List<string>();
        for (var i = 0; i < scriptArgs.Count; i++)
        {
            var token = scriptArgs[i];
            var name = token.Split('=', 2)[0];
            var option = token.StartsWith('-') ? FindOption(run, name) : null;
            if (option is null)
            {
                rest.Add(token);
                continue;
            }
            names.Add($"'{name}'");
            moved.Add(token);
            if (TakesValue(option) && !token.Contains('=') && i + 1 < scriptArgs.Count) moved.Add(scriptArgs[++i]);
        }
        if (names.Count == 0) return null;
        var command = hostArgs.SkipLast(1).Concat(moved).Append(hostArgs[^1]).Concat(rest).Select(Quote);
        var (them, it) = names.Count == 1 ? ("it", "comes") : ("them", "come");
        return $"note: {string.Join(", ", names)} {it} after the script, so the script receives {them} in Args; " +
               $"put the host's options before the script: dotnet loraHub {string.Join(' ', command)}";
    }

    private static Option? FindOption(Command command, string token) =>
        command.Options.Concat(AncestorOptions(command)).FirstOrDefault(o => o.Name == token || o.Aliases.Contains(token));

    private static string Quote(string arg) => arg.Length > 0 && !arg.Any(c => char.IsWhiteSpace(c) || c is '"' or '\'' or '$') ? arg : $"'{arg}'";

    // Boolean options accept an optional value but are written as flags; treating them as flags keeps `-v run` working.
    private static bool TakesValue(Option option) => option.ValueType != typeof(bool) && option.Arity.MaximumNumberOfValues > 0;

    private static IEnumerable<Option> AncestorOptions(Command command) =>
        command.Parents.OfType<Command>().SelectMany(p => p.Options.Where(o => o.Recursive).Concat(AncestorOptions(p)));
}
