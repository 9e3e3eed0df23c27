using System.Text;
using LoRAHub.Models;
using LoRAHub.Plugins.LoRA;
using LoRAHub.Safetensors;
using Xunit.Abstractions;

namespace LoRAHub.Reliability.Tests;

/// <summary>
/// Trust boundaries (issue 21, part 4): loading a model or an adapter never executes code from it — there is no pickle
/// reader, and a pickle is refused with the way to safetensors — and a plugin folder that other users can write to is
/// not loaded.
/// </summary>
[Collection(Serial.Name)]
public sealed class TrustBoundaryTests(ITestOutputHelper output)
{
    /// <summary>
    /// A protocol-2 pickle whose unpickling calls os.system("touch MARKER") (GLOBAL posix.system, BINUNICODE arg, TUPLE1,
    /// REDUCE): any reader that unpickled it would create the marker file.
    /// </summary>
    private static byte[] MaliciousPickle(string marker)
    {
        var command = Encoding.UTF8.GetBytes($"touch {marker}");
        return [0x80, 0x02, .. "cposix\nsystem\n"u8, (byte)'X', .. BitConverter.GetBytes(command.Length), .. command, 0x85, (byte)'R', (byte)'.'];
    }

    [Fact]
    public void A_model_folder_with_pickle_weights_is_refused_and_nothing_in_it_runs()
    {
        using var temp = new TempFolder("trust-model");
        var folder = temp["model"];
        Directory.CreateDirectory(folder);
        var marker = temp["pwned-model"];
        using (var model = TrainChild.TinyModel()) File.WriteAllText(Path.Combine(folder, "config.json"), model.ConfigJson());
        File.WriteAllBytes(Path.Combine(folder, "pytorch_model.bin"), MaliciousPickle(marker));
        var e = Assert.ThrowsAny<Exception>(() => PretrainedModel.Load(folder).Dispose());
        Assert.Contains("pytorch_model.bin", e.Message);
        Assert.Contains("never pickle", e.Message);
        Assert.Contains("safetensors", e.Message);
        Assert.False(File.Exists(marker));

        // The same bytes under a .safetensors name: refused as a pickle, not parsed.
        File.Move(Path.Combine(folder, "pytorch_model.bin"), Path.Combine(folder, "model.safetensors"));
        var renamed = Assert.Throws<SafetensorsFormatException>(() => PretrainedModel.Load(folder).Dispose());
        Assert.Contains("pickle", renamed.Message);
        Assert.False(File.Exists(marker));
        output.WriteLine(e.Message);
    }

    [Fact]
    public void An_adapter_folder_with_pickle_weights_is_refused_and_nothing_in_it_runs()
    {
        using var temp = new TempFolder("trust-adapter");
        var folder = temp["adapter"];
        var marker = temp["pwned-adapter"];
        using var model = TrainChild.TinyModel();
        using (var adapter = TrainChild.AttachLora(model)) adapter.Save(folder);
        File.Delete(Path.Combine(folder, "adapter_model.safetensors"));
        File.WriteAllBytes(Path.Combine(folder, "adapter_model.bin"), MaliciousPickle(marker));
        using var fresh = TrainChild.TinyModel();
        var e = Assert.ThrowsAny<Exception>(() => new LoraMethod().Load(fresh, folder).Dispose());
        Assert.Contains("adapter_model.safetensors", e.Message);
        Assert.False(File.Exists(marker));

        // Renamed to the safetensors name: refused as a pickle.
        File.Move(Path.Combine(folder, "adapter_model.bin"), Path.Combine(folder, "adapter_model.safetensors"));
        var renamed = Assert.ThrowsAny<Exception>(() => new LoraMethod().Load(fresh, folder).Dispose());
        Assert.Contains("pickle", renamed.Message);
        Assert.False(File.Exists(marker));
        output.WriteLine(e.Message);
    }

    [Fact]
    public void A_plugin_folder_other_users_can_write_to_is_refused()
    {
        if (OperatingSystem.IsWindows()) return; // Unix permissions; Windows ACLs are another check
        using var temp = new TempFolder("trust-plugin");
        var plugin = HostCli.Plugin(temp["plugins"], "Writable", HostCli.FaultySource("writable-method", "nowhere"));
        File.SetUnixFileMode(plugin, File.GetUnixFileMode(plugin) | UnixFileMode.GroupWrite | UnixFileMode.OtherWrite);
        var run = HostCli.Run(temp.Path, new Dictionary<string, string> { ["LORAHUB_PLUGIN_PATH"] = plugin }, "methods");
        Assert.True(run.ExitCode == 0, run.Text);
        Assert.DoesNotContain("writable-method ", run.Text.Split("Broken plugins")[0]);
        Assert.Contains("Writable", run.Text);
        Assert.Contains("writable by every user", run.Text);
        Assert.Contains("chmod go-w", run.Text);
    }
}
