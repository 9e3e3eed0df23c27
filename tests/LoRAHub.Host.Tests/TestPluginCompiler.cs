using LoRAHub.Abstractions;
using Microsoft.CodeAnalysis;
using Microsoft.CodeAnalysis.CSharp;

namespace LoRAHub.Host.Tests;

/// <summary>Builds small plugin and library DLLs from C# source at test time, so loader cases need no extra projects.</summary>
public static class TestPluginCompiler
{
    private static readonly MetadataReference[] FrameworkAndContract =
        ((string)AppContext.GetData("TRUSTED_PLATFORM_ASSEMBLIES")!).Split(Path.PathSeparator)
        .Where(p => Path.GetFileName(p) is var f && (f.StartsWith("System.", StringComparison.Ordinal) || f is "netstandard.dll" or "mscorlib.dll"))
        .Append(typeof(IAdapterMethod).Assembly.Location)
        .Append(typeof(TorchSharp.torch.Tensor).Assembly.Location)
        .Select(p => (MetadataReference)MetadataReference.CreateFromFile(p))
        .ToArray();

    /// <summary>Compiles <paramref name="source"/> to <paramref name="outputPath"/>; extra references are DLL paths.</summary>
    public static string Compile(string assemblyName, string source, string outputPath, params string[] references)
    {
        var compilation = CSharpCompilation.Create(
            assemblyName,
            [CSharpSyntaxTree.ParseText(source)],
            FrameworkAndContract.Concat(references.Select(r => MetadataReference.CreateFromFile(r))),
            new CSharpCompilationOptions(OutputKind.DynamicallyLinkedLibrary, nullableContextOptions: NullableContextOptions.Disable));
        Directory.CreateDirectory(Path.GetDirectoryName(outputPath)!);
        using var stream = File.Create(outputPath);
        var result = compilation.Emit(stream);
        Assert.True(result.Success, string.Join("\n", result.Diagnostics));
        return outputPath;
    }

    /// <summary>A plugin assembly with one method class.</summary>
    public static string MethodSource(string methodName, string description = "\"test method\"", string constructorBody = "",
        string contract = "ContractVersion.Major, ContractVersion.Minor", string typeName = "TestMethod", string claims = "false") => $$"""
        using System;
        using LoRAHub.Abstractions;
        [assembly: AdapterPlugin({{contract}})]
        [assembly: System.Reflection.AssemblyInformationalVersion("3.2.1")]
        namespace TestPlugins;
        public sealed class {{typeName}} : IAdapterMethod
        {
            public {{typeName}}() { {{constructorBody}} }
            public string Name => "{{methodName}}";
            public string Description => {{description}};
            public Type OptionsType => typeof(object);
            public object CreateDefaultOptions() => new object();
            public IAdapter Attach(IAdaptableModel model, object options) => throw new NotSupportedException();
            public IAdapter Load(IAdaptableModel model, string directory) => throw new NotSupportedException();
            public bool Claims(string directory) => {{claims}};
        }
        """;

    /// <summary>Compiles a plugin into <c>root/&lt;folderName&gt;/&lt;folderName&gt;.dll</c> and returns the folder.</summary>
    public static string Plugin(string root, string folderName, string source, params string[] references)
    {
        var folder = Path.Combine(root, folderName);
        Compile(folderName, source, Path.Combine(folder, folderName + ".dll"), references);
        return folder;
    }
}
