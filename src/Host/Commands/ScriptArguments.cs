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
                if (TakesValue(command, token) && !token.Contains('=') && !token.Contains(':')) i++;
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

    // Boolean options accept an optional value but are written as flags; treating them as flags keeps `-v run` working.
    private static bool TakesValue(Command command, string token) =>
        command.Options.Concat(AncestorOptions(command)).Any(o =>
            (o.Name == token || o.Aliases.Contains(token)) && o.ValueType != typeof(bool) && o.Arity.MaximumNumberOfValues > 0);

    private static IEnumerable<Option> AncestorOptions(Command command) =>
        command.Parents.OfType<Command>().SelectMany(p => p.Options.Where(o => o.Recursive).Concat(AncestorOptions(p)));
}
