using LoRAHub.Host.Plugins;

namespace LoRAHub.Host.Tests;

using static TestPluginCompiler;

/// <summary>Issue 21's trust rule: a plugin folder that other users can write to is refused, with the fix in the message.</summary>
public sealed class PluginTrustTests : IDisposable
{
    private readonly TempFolder temp = new();

    public void Dispose() => temp.Dispose();

    [Fact]
    public void A_folder_only_its_owner_can_write_loads()
    {
        if (OperatingSystem.IsWindows()) return;
        var folder = Plugin(temp.Path, "Alpha", MethodSource("alpha"));
        File.SetUnixFileMode(folder, (UnixFileMode)0b111_101_101); // 755

        var registry = new PluginLoader().Load([folder]);

        Assert.Empty(registry.Broken);
        Assert.Null(PluginTrust.Check(folder)); // the temp folder above it is world-writable but sticky (/tmp)
    }

    [Theory]
    [InlineData(0b111_111_111, "writable by every user")]   // 777
    [InlineData(0b111_111_101, "writable by group")]        // 775 with a group that is not the user's own
    public void A_folder_others_can_write_is_refused_with_the_fix(int mode, string reason)
    {
        if (OperatingSystem.IsWindows()) return;
        var folder = Plugin(temp.Path, "Alpha", MethodSource("alpha"));
        File.SetUnixFileMode(folder, (UnixFileMode)mode);
        if (reason.Contains("group"))
        {
            // Group write is fine for a user-private group (umask 002): give the folder another group, if we may.
            if (!ChangeGroup(folder, 65534)) return; // nogroup; only root may do this
        }

        var registry = new PluginLoader().Load([folder]);

        var broken = Assert.Single(registry.Broken);
        Assert.Contains(reason, broken.Reason);
        Assert.Contains($"chmod go-w '{folder}'", broken.Reason);
        Assert.DoesNotContain(registry.All, m => m.Name == "alpha");
    }

    [Fact]
    public void A_writable_plugin_file_is_refused()
    {
        if (OperatingSystem.IsWindows()) return;
        var folder = Plugin(temp.Path, "Alpha", MethodSource("alpha"));
        var dll = Path.Combine(folder, "Alpha.dll");
        File.SetUnixFileMode(dll, (UnixFileMode)0b110_110_110); // 666

        Assert.Contains("Alpha.dll is writable by every user", PluginTrust.Check(folder));
    }

    [System.Runtime.InteropServices.DllImport("libc", SetLastError = true)]
    private static extern int chown(string path, int owner, int group);

    private static bool ChangeGroup(string path, int group) => chown(path, -1, group) == 0;
}
