namespace LoRAHub.Tuners.Tests;

/// <summary>Temporary folders and the repository's fixtures.</summary>
internal static class Folders
{
    public static string Temp()
    {
        var dir = Path.Combine(Path.GetTempPath(), "lorahub-tuners-tests", Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dir);
        return dir;
    }

    /// <summary>The Models suite's tiny Llama (config.json + model.safetensors, transformers' keys).</summary>
    public static string LlamaFixture => Path.Combine(RepoRoot(), "tests", "LoRAHub.Models.Tests", "fixtures", "llama");

    private static string RepoRoot()
    {
        var dir = new DirectoryInfo(AppContext.BaseDirectory);
        while (dir is not null && !File.Exists(Path.Combine(dir.FullName, "LoRAHub.sln"))) dir = dir.Parent;
        return dir?.FullName ?? throw new DirectoryNotFoundException("LoRAHub.sln not found above " + AppContext.BaseDirectory);
    }
}
