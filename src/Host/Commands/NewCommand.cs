using System.CommandLine;
using LoRAHub.Host.Everyday;
using LoRAHub.Host.Plugins;

namespace LoRAHub.Host.Commands;

/// <summary><c>new script &lt;folder&gt;</c> and <c>new method &lt;Name&gt;</c>: thin wrappers over <see cref="Scaffold"/>.</summary>
public static class NewCommand
{
    public static Command Create(LoRAHubCli cli)
    {
        var scriptFolder = new Argument<string>("folder") { Description = "Where to write the script (with the embedded base model beside it)" };
        var scriptForce = CommonOptions.Force();
        var script = new Command("script", "A training script that runs as it is (examples/finetune.csx and the embedded base model)") { scriptFolder, scriptForce };
        script.SetAction((parse, _) => cli.Guard(() =>
        {
            var files = Scaffold.NewScript(cli.HostBaseDirectory, parse.GetValue(scriptFolder)!, parse.GetValue(scriptForce));
            var main = files.First(f => f.EndsWith("finetune.csx", StringComparison.Ordinal));
            cli.Output.WriteLine($"wrote {files.Count} files; run it: dotnet loraHub run {main}");
            return ExitCodes.Ok;
        }));

        var name = new Argument<string>("name") { Description = "The plugin's name (a C# identifier, e.g. MyMethod); the method is its lower-case form" };
        var output = new Option<string?>("--output", "-o") { Description = "The project folder (default: ./<name>)" };
        var methodForce = CommonOptions.Force();
        var method = new Command("method", "A method plugin project from templates/MethodPlugin, compiled against this host") { name, output, methodForce };
        method.SetAction((parse, _) => cli.Guard(() =>
        {
            var pluginName = parse.GetValue(name)!;
            var folder = parse.GetValue(output) ?? pluginName;
            var files = Scaffold.NewMethod(cli.HostBaseDirectory, pluginName, folder, parse.GetValue(methodForce));
            // Built into the per-user plugin folder, the host finds it with no --plugins or LORAHUB_PLUGIN_PATH.
            cli.Output.WriteLine($"wrote {files.Count} files to {Path.GetFullPath(folder)}; build: dotnet build {Path.GetFullPath(folder)} -o " +
                Path.Combine(PluginFolders.UserDirectory(), pluginName));
            return ExitCodes.Ok;
        }));
        return new Command("new", "Scaffold a training script or a method plugin") { script, method };
    }
}
