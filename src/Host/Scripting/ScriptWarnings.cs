using Microsoft.CodeAnalysis;
using Microsoft.CodeAnalysis.CSharp.Syntax;

namespace LoRAHub.Host.Scripting;

/// <summary>
/// Warnings the host adds to the compiler's: calls that compile but can end the process where a .NET user expects an
/// exception. Reported in the compiler's own format (<c>path(line,col): warning LH0001: ...</c>) when a script compiles.
/// </summary>
public static class ScriptWarnings
{
    /// <summary>TorchSharp 0.107's native THSTensor_matmul has no try/catch: a bad shape, dtype or device aborts the process.</summary>
    public const string NativeMatmul =
        "LH0001: TorchSharp's matmul ends the whole process on a shape, dtype or device mismatch (its native code lets the " +
        "C++ error escape, so no try/catch sees it); torchx.matmul(a, b) computes the same product and throws a catchable exception";

    /// <summary>Lines as the compiler writes its diagnostics, so editors and terminals link them to the place.</summary>
    public static IReadOnlyList<string> Find(Compilation compilation)
    {
        var found = new List<string>();
        foreach (var tree in compilation.SyntaxTrees)
        {
            var model = compilation.GetSemanticModel(tree);
            foreach (var call in tree.GetRoot().DescendantNodes().OfType<InvocationExpressionSyntax>())
            {
                if (Callee(call) != "matmul") continue; // cheap syntactic filter before binding
                if (model.GetSymbolInfo(call).Symbol is IMethodSymbol { Name: "matmul" } method && IsTorchSharp(method.ContainingType))
                {
                    var span = call.GetLocation().GetMappedLineSpan();
                    found.Add($"{span.Path}({span.StartLinePosition.Line + 1},{span.StartLinePosition.Character + 1}): warning {NativeMatmul}");
                }
            }
        }
        return found;
    }

    private static string? Callee(InvocationExpressionSyntax call) => call.Expression switch
    {
        MemberAccessExpressionSyntax member => member.Name.Identifier.ValueText,
        IdentifierNameSyntax name => name.Identifier.ValueText, // `using static TorchSharp.torch;` then matmul(a, b)
        _ => null,
    };

    private static bool IsTorchSharp(INamedTypeSymbol? type)
    {
        for (var ns = type?.ContainingNamespace; ns is { IsGlobalNamespace: false }; ns = ns.ContainingNamespace)
            if (ns.ContainingNamespace.IsGlobalNamespace) return ns.Name == "TorchSharp";
        return false;
    }
}
