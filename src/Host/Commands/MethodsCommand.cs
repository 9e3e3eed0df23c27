using System.CommandLine;
using LoRAHub.Host.Plugins;
using Microsoft.Extensions.DependencyInjection;

namespace LoRAHub.Host.Commands;

/// <summary><c>methods</c>: the discovered plugins' methods, then the skipped plugins with their reasons.</summary>
public static class MethodsCommand
{
    public static Command Create(LoRAHubCli cli)
    {
        var command = new Command("methods", "List the adaptation methods found in plugin folders, and broken plugins");
        command.SetAction((parse, _) => cli.Execute(parse, host =>
        {
            Write(host.Services.GetRequiredService<IMethodRegistry>(), cli.Output);
            return Task.FromResult(ExitCodes.Ok);
        }));
        return command;
    }

    public static void Write(IMethodRegistry registry, TextWriter output)
    {
        if (registry.All.Count == 0)
            output.WriteLine($"No methods found. Plugin folders: <host>/plugins/*, {PluginFolders.UserDirectory()}/*, --plugins and ${PluginFolders.PluginPathVariable}.");
        else
        {
            string[] header = ["NAME", "VERSION", "CONTRACT", "DESCRIPTION", "FOLDER"];
            var rows = registry.All.Select(m => new[] { m.Name, m.Version, m.ContractVersion, m.Description, m.Folder }).ToList();
            // The last column is left unpadded so that long folder paths do not widen every line.
            var widths = Enumerable.Range(0, header.Length - 1).Select(c => rows.Prepend(header).Max(r => r[c].Length)).ToArray();
            foreach (var row in rows.Prepend(header))
                output.WriteLine(string.Join("  ", row.Select((cell, c) => c < widths.Length ? cell.PadRight(widths[c]) : cell)));
        }
        if (registry.Broken.Count == 0) return;
        output.WriteLine();
        output.WriteLine("Broken plugins (skipped):");
        foreach (var broken in registry.Broken) output.WriteLine($"  {broken.PluginName}: {broken.Reason} [{broken.Folder}]");
    }
}
