using System.Security.Cryptography;
using LoRAHub.Reliability.Tests.Corpus;
using Microsoft.CodeAnalysis;
using Microsoft.CodeAnalysis.CSharp;

namespace LoRAHub.Reliability.Tests;

/// <summary>The real host (`loraHub`) as a child process, and plugins compiled at test time for it.</summary>
internal static class HostCli
{
    /// <summary>LORAHUB_HOST, else the host the solution build leaves in src/Host/bin/Release (CI builds it before the tests), else the published one.</summary>
    public static string HostDll
    {
        get
        {
            var candidates = new[]
            {
                Environment.GetEnvironmentVariable("LORAHUB_HOST"),
                Path.Combine(ModelCases.RepoRoot(), "src", "Host", "bin", "Release", "net10.0", "loraHub.dll"),
                // The GPU machine's bundle (its libtorch comes through LORAHUB_LIBTORCH, set by scripts/gpu/env.sh).
                Path.Combine(ModelCases.RepoRoot(), ".publish", "host", "loraHub.dll"),
            };
            return candidates.FirstOrDefault(c => !string.IsNullOrEmpty(c) && File.Exists(c))
                   ?? throw new InvalidOperationException("the host is not built: build src/Host (Release) or set LORAHUB_HOST to loraHub.dll");
        }
    }

    public static ChildProcess.Result Run(string directory, IReadOnlyDictionary<string, string>? env, params string[] args) =>
        ChildProcess.Run(ChildProcess.Dotnet, [HostDll, .. args], env, timeoutSeconds: 180, directory: directory);

    private static readonly MetadataReference[] References =
        ((string)AppContext.GetData("TRUSTED_PLATFORM_ASSEMBLIES")!).Split(Path.PathSeparator)
        .Where(p => Path.GetFileName(p) is var f && (f.StartsWith("System.", StringComparison.Ordinal) || f is "netstandard.dll" or "mscorlib.dll"))
        .Append(typeof(IAdapterMethod).Assembly.Location)
        .Append(typeof(torch.Tensor).Assembly.Location)
        .Append(typeof(torchx).Assembly.Location)
        .Select(p => (MetadataReference)MetadataReference.CreateFromFile(p))
        .ToArray();

    /// <summary>Compiles a plugin into <c>root/name/name.dll</c>; returns the folder.</summary>
    public static string Plugin(string root, string name, string source)
    {
        var folder = Path.Combine(root, name);
        Directory.CreateDirectory(folder);
        var compilation = CSharpCompilation.Create(name, [CSharpSyntaxTree.ParseText(source)], References,
            new CSharpCompilationOptions(OutputKind.DynamicallyLinkedLibrary, nullableContextOptions: NullableContextOptions.Disable));
        using var stream = File.Create(Path.Combine(folder, name + ".dll"));
        var result = compilation.Emit(stream);
        Assert.True(result.Success, string.Join("\n", result.Diagnostics));
        return folder;
    }

    /// <summary>A method plugin "name" that throws "boom in {where}" in its constructor, Attach or OnStepBegin (step 2).</summary>
    public static string FaultySource(string name, string where) => $$"""
        using System;
        using System.Collections.Generic;
        using System.Linq;
        using LoRAHub.Abstractions;
        using LoRAHub.TorchExtensions.Optim;
        using TorchSharp;
        using static TorchSharp.torch;
        [assembly: AdapterPlugin(ContractVersion.Major, ContractVersion.Minor)]
        namespace Faulty;
        public sealed class FaultyMethod : IAdapterMethod
        {
            public FaultyMethod() { if ("{{where}}" == "constructor") throw new InvalidOperationException("boom in constructor"); }
            public string Name => "{{name}}";
            public string Description => "throws in {{where}}";
            public Type OptionsType => typeof(object);
            public object CreateDefaultOptions() => new object();
            public IAdapter Attach(IAdaptableModel model, object options) =>
                "{{where}}" == "attach" ? throw new InvalidOperationException("boom in attach") : new FaultyAdapter(this, model);
            public IAdapter Load(IAdaptableModel model, string directory) => throw new NotSupportedException();
            public bool Claims(string directory) => false;
        }
        public sealed class FaultyAdapter : IAdapter
        {
            private readonly IAdapterMethod method;
            private readonly IAdaptableModel model;
            public FaultyAdapter(IAdapterMethod method, IAdaptableModel model) { this.method = method; this.model = model; }
            public IAdapterMethod Method => method;
            public object Options => new object();
            public bool Enabled { get; set; } = true;
            public long ModelParameterCount => 0;
            public IReadOnlyList<ParamGroup> ParameterGroups(double lr, double wd) =>
                new[] { new ParamGroup(model.Root.parameters().Take(1).Select(p => (Tensor)p), lr, wd) };
            public IReadOnlyDictionary<string, Tensor> StateDict() => new Dictionary<string, Tensor>();
            public void Save(string directory) { }
            public void OnStepBegin(long step) { if ("{{where}}" == "hook" && step == 2) throw new InvalidOperationException("boom in hook"); }
            public void Dispose() { }
        }
        """;

    /// <summary>Name → SHA-256 of every file under a folder, to show a run changed none of them.</summary>
    public static Dictionary<string, string> Hashes(string folder) =>
        Directory.EnumerateFiles(folder, "*", SearchOption.AllDirectories)
            .ToDictionary(p => p, p => Convert.ToHexString(SHA256.HashData(File.ReadAllBytes(p))));
}
