using System.Reflection;
using TorchSharp;
using TorchSharp.Modules;
using TorchSharp.Utils;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// Swapping one parameter of a module for another tensor (PyTorch's <c>setattr(module, "weight", nn.Parameter(...))</c>),
/// which TorchSharp lacks: its register_parameter refuses a taken name, and Linear's property setter disposes the old
/// parameter. Used where a method keeps a module in place but trains a copy of its weights (PEFT's modules_to_save) and
/// must be able to put the original back.
/// </summary>
public static class ParameterReplacement
{
    private const BindingFlags InstanceMembers = BindingFlags.Instance | BindingFlags.Public | BindingFlags.NonPublic;

    /// <summary>
    /// Puts <paramref name="replacement"/> where the module's own parameter <paramref name="name"/> (not a dotted path) is,
    /// and returns the parameter it replaced, neither disposed nor changed. The module's field for it (TorchSharp's
    /// component name, e.g. Linear's <c>_weight</c> for "weight") is set, so forward uses the replacement, and the
    /// registration keeps its position (parameters() and state_dict() order do not change). A module that keeps the
    /// parameter natively (TorchSharp's Embedding) is set through its property.
    /// </summary>
    /// <exception cref="KeyNotFoundException">The module has no parameter <paramref name="name"/>.</exception>
    /// <exception cref="InvalidOperationException">The module keeps it in no field or settable property.</exception>
    public static Parameter replace_parameter(this nn.Module module, string name, Parameter replacement)
    {
        ArgumentNullException.ThrowIfNull(replacement);
        var table = typeof(nn.Module).GetField("_internal_params", InstanceMembers)?.GetValue(module) as OrderedDict<string, Parameter>
            ?? throw new InvalidOperationException("TorchSharp's Module has no _internal_params table (TorchSharp version changed?)");
        if (!table.TryGetValue(name, out var old))
            throw new KeyNotFoundException($"{module.TypeName()} has no parameter '{name}'; it has [{string.Join(", ", table.Keys)}]");
        if (ReferenceEquals(old, replacement)) return old;

        var field = Fields(module.GetType()).FirstOrDefault(f => f.ComponentName() == name && f.FieldType.IsAssignableFrom(typeof(Parameter)));
        if (field is not null)
        {
            field.SetValue(module, replacement);
            table[name] = replacement;
            return old;
        }
        // Native-backed modules (Embedding) hold the tensor in libtorch; their setter replaces it there without disposing.
        var property = module.GetType().GetProperty(name, BindingFlags.Instance | BindingFlags.Public);
        if (property is { CanWrite: true } && property.PropertyType.IsAssignableFrom(typeof(Parameter)) && module is not Linear)
        {
            property.SetValue(module, replacement);
            table[name] = replacement;
            return old;
        }
        throw new InvalidOperationException($"cannot replace parameter '{name}' of {module.TypeName()}: it is held in no field or settable property");
    }

    private static IEnumerable<FieldInfo> Fields(Type? type)
    {
        var seen = new HashSet<string>();
        for (; type is not null && type != typeof(object); type = type.BaseType)
            foreach (var f in type.GetFields(InstanceMembers | BindingFlags.DeclaredOnly))
                if (seen.Add(f.Name)) yield return f;
    }
}
