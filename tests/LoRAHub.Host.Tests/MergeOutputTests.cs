using LoRAHub.Host.Commands;
using LoRAHub.Models;

namespace LoRAHub.Host.Tests;

/// <summary>
/// merge's output folder: never one the merge reads from (even with --force), refused before anything loads when it
/// cannot be a folder, and never left half-written. Runs on a copy of the embedded model, so a regression damages a
/// temporary folder, not the repository's.
/// </summary>
[Collection(EmbeddedModelCollection.Name)]
public sealed class MergeOutputTests(EmbeddedModelFixture fixture) : IDisposable
{
    private readonly TempFolder temp = new();

    public void Dispose() => temp.Dispose();

    private string CopyOfBase(string name)
    {
        var folder = temp.Combine(name);
        Directory.CreateDirectory(folder);
        foreach (var file in Directory.GetFiles(fixture.BaseModel)) File.Copy(file, Path.Combine(folder, Path.GetFileName(file)));
        return folder;
    }

    private static Dictionary<string, byte[]> Snapshot(string folder) =>
        Directory.GetFiles(folder, "*", SearchOption.AllDirectories).ToDictionary(f => Path.GetRelativePath(folder, f), File.ReadAllBytes);

    private static void AssertUnchanged(Dictionary<string, byte[]> before, string folder)
    {
        var after = Snapshot(folder);
        Assert.Equal(before.Keys.Order(), after.Keys.Order());
        foreach (var (name, bytes) in before) Assert.True(bytes.AsSpan().SequenceEqual(after[name]), $"{name} changed");
    }

    [Fact]
    public async Task The_base_folder_as_output_is_refused_even_with_force()
    {
        var baseModel = CopyOfBase("base");
        var before = Snapshot(baseModel);

        var (code, _, error) = await fixture.Cli("merge", baseModel, fixture.AdapterA, "-o", baseModel, "--force");

        Assert.Equal(ExitCodes.UsageError, code);
        Assert.Contains($"error: -o {baseModel} is the base model's folder; merging would overwrite the weights it is read from. Choose another output folder.", error);
        AssertUnchanged(before, baseModel);
        // Spelled differently, the same folder: a trailing separator, a detour through "..".
        foreach (var spelling in new[] { baseModel + Path.DirectorySeparatorChar, Path.Combine(baseModel, "..", "base") })
            Assert.Contains("is the base model's folder", (await fixture.Cli("merge", baseModel, fixture.AdapterA, "-o", spelling, "--force")).Error);
        AssertUnchanged(before, baseModel);
    }

    [Fact]
    public async Task Outputs_inside_or_around_the_base_or_adapter_folder_are_refused()
    {
        var baseModel = CopyOfBase("base");
        var before = Snapshot(baseModel);
        var adapterBefore = Snapshot(fixture.AdapterA);

        var inside = await fixture.Cli("merge", baseModel, fixture.AdapterA, "-o", Path.Combine(baseModel, "merged"), "--force");
        var around = await fixture.Cli("merge", baseModel, fixture.AdapterA, "-o", temp.Path, "--force");
        var adapter = await fixture.Cli("merge", baseModel, fixture.AdapterA, "-o", fixture.AdapterA, "--force");

        Assert.Equal(ExitCodes.UsageError, inside.Code);
        Assert.Contains($"lies inside the base model's folder {baseModel}", inside.Error);
        Assert.Equal(ExitCodes.UsageError, around.Code);
        Assert.Contains($"holds the base model's folder {baseModel}", around.Error);
        Assert.Equal(ExitCodes.UsageError, adapter.Code);
        Assert.Contains($"-o {fixture.AdapterA} is the adapter folder; merging would overwrite the adapter it is read from", adapter.Error);
        Assert.False(Directory.Exists(Path.Combine(baseModel, "merged")));
        AssertUnchanged(before, baseModel);
        AssertUnchanged(adapterBefore, fixture.AdapterA);
    }

    [Fact]
    public async Task A_link_to_the_base_folder_is_the_base_folder()
    {
        if (OperatingSystem.IsWindows()) return; // symbolic links need a privilege there
        var baseModel = CopyOfBase("base");
        var before = Snapshot(baseModel);
        var link = temp.Combine("link");
        Directory.CreateSymbolicLink(link, baseModel);

        var (code, _, error) = await fixture.Cli("merge", link, fixture.AdapterA, "-o", baseModel, "--force");
        var throughLink = await fixture.Cli("merge", baseModel, fixture.AdapterA, "-o", Path.Combine(link, "merged"), "--force");

        Assert.Equal(ExitCodes.UsageError, code);
        Assert.Contains("is the base model's folder", error);
        Assert.Equal(ExitCodes.UsageError, throughLink.Code);
        Assert.Contains("lies inside the base model's folder", throughLink.Error);
        AssertUnchanged(before, baseModel);
    }

    [Fact]
    public async Task An_output_that_cannot_be_a_folder_is_refused_before_the_model_loads()
    {
        // The base does not exist: an answer about it would mean the model was loaded before the output was checked.
        var missingBase = temp.Combine("no-such-model");
        var file = temp.Write("taken.txt", "not a folder");

        var onFile = await fixture.Cli("merge", missingBase, fixture.AdapterA, "-o", file);

        Assert.Equal(ExitCodes.UsageError, onFile.Code);
        Assert.Contains($"error: -o {file} is a file, not a folder; name a folder for the merged model", onFile.Error);
        Assert.Equal("not a folder", File.ReadAllText(file));
        if (OperatingSystem.IsLinux())
        {
            var unwritable = await fixture.Cli("merge", missingBase, fixture.AdapterA, "-o", "/proc/lorahub-merge-test");
            Assert.Equal(ExitCodes.UsageError, unwritable.Code);
            Assert.Contains("error: cannot write the output folder /proc/lorahub-merge-test: /proc does not take new folders; " +
                "choose a folder you can write to with -o.", unwritable.Error);
        }
    }

    [Fact]
    public async Task A_merge_that_fails_half_way_leaves_no_output_folder()
    {
        var baseModel = CopyOfBase("torn-base");
        var weights = Path.Combine(baseModel, "model.safetensors");
        using (var stream = File.Open(weights, FileMode.Open)) stream.SetLength(stream.Length / 2);
        var output = temp.Combine("out", "merged");

        var (code, _, error) = await fixture.Cli("merge", baseModel, fixture.AdapterA, "-o", output);

        Assert.NotEqual(ExitCodes.Ok, code);
        Assert.Contains("error:", error);
        Assert.False(Directory.Exists(output));
        Assert.Empty(Directory.GetFileSystemEntries(temp.Combine("out"))); // the hidden staging folder is gone too
    }

    [Fact]
    public async Task Force_replaces_the_merged_files_and_keeps_the_others()
    {
        var output = temp.Combine("merged");
        Assert.Equal(ExitCodes.Ok, (await fixture.Cli("merge", fixture.BaseModel, fixture.AdapterA, "-o", output)).Code);
        var first = File.ReadAllBytes(Path.Combine(output, "model.safetensors"));
        File.WriteAllText(Path.Combine(output, "notes.txt"), "mine");

        var (code, _, error) = await fixture.Cli("merge", fixture.BaseModel, fixture.AdapterB, "-o", output, "--force");

        Assert.True(code == ExitCodes.Ok, error);
        Assert.False(first.AsSpan().SequenceEqual(File.ReadAllBytes(Path.Combine(output, "model.safetensors"))));
        Assert.Equal("mine", File.ReadAllText(Path.Combine(output, "notes.txt")));
        Assert.Equal(["config.json", "model.safetensors", "notes.txt", "tokenizer.json"],
            Directory.GetFileSystemEntries(output).Select(Path.GetFileName).Order(StringComparer.Ordinal));
        Assert.Empty(Directory.GetDirectories(temp.Path, ".merged.merging-*", new EnumerationOptions { AttributesToSkip = 0 }));
        using var _ = PretrainedModel.LoadLlama(output);
    }
}
