using System.Collections;
using System.Reflection;
using TorchSharp;
using TorchSharp.Modules;
using TorchSharp.Utils;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// Module surgery TorchSharp lacks (PyTorch's <c>get_submodule</c>, <c>setattr</c> of a child), used by adapter methods to
/// swap a Linear for a LoRA layer. A TorchSharp module calls the module held in its field at forward time, so replacing
/// a child means setting that field and re-registering the child (for parameters(), state_dict(), to(), Dispose()).
/// </summary>
public static class ModuleExtensions
{
    private const BindingFlags InstanceFields = BindingFlags.Instance | BindingFlags.Public | BindingFlags.NonPublic;

    /// <summary>The module at a dotted path ("model.layers.0.self_attn"), "" for the module itself; null if absent.</summary>
    public static nn.Module? get_submodule(this nn.Module module, string path)
    {
        ArgumentNullException.ThrowIfNull(path);
        var current = module;
        if (path.Length == 0) return current;
        foreach (var part in path.Split('.'))
        {
            current = Child(current, part);
            if (current is null) return null;
        }
        return current;
    }

    /// <summary>
    /// Replaces the module at a dotted path and returns the module it replaced (not disposed: the caller usually wraps it).
    /// The parent's field holding the child (matched by TorchSharp's component name, else by reference) is set, so the
    /// parent's forward uses the replacement; ModuleList, ModuleDict and Sequential parents are updated in place. The
    /// child keeps its position among the parent's children, so parameter order (and state_dict order) is unchanged.
    /// </summary>
    /// <exception cref="KeyNotFoundException">No module at <paramref name="path"/>.</exception>
    /// <exception cref="InvalidOperationException">The parent's field or list cannot hold the replacement's type.</exception>
    public static nn.Module replace_submodule(this nn.Module module, string path, nn.Module replacement)
    {
        ArgumentNullException.ThrowIfNull(replacement);
        if (path.Length == 0) throw new ArgumentException("cannot replace the root module (empty path)", nameof(path));
        var dot = path.LastIndexOf('.');
        var parentPath = dot < 0 ? "" : path[..dot];
        var name = dot < 0 ? path : path[(dot + 1)..];
        var parent = module.get_submodule(parentPath) ?? throw new KeyNotFoundException($"no module at '{parentPath}' (replacing '{path}')");
        var old = Child(parent, name) ?? throw new KeyNotFoundException(
            $"no module at '{path}': {parent.TypeName()} has children [{string.Join(", ", parent.named_children().Select(c => c.name))}]");
        if (ReferenceEquals(old, replacement)) return old;

        switch (parent)
        {
            case Sequential sequential:
                ReplaceInSequential(sequential, name, old, replacement, path);
                return old; // Sequential keeps its own lists and does not use the registration table.
            case var _ when GenericInterface(parent, typeof(IList<>)) is { } listType && int.TryParse(name, out var index):
                // ModuleList<T>: forward and indexing read its own list.
                var element = listType.GetGenericArguments()[0];
                CheckAssignable(element, replacement, $"{parent.TypeName()}<{Describe(element)}> at '{parentPath}'", path);
                listType.GetProperty("Item")!.SetValue(parent, replacement, [index]);
                break;
            case var _ when GenericInterface(parent, typeof(IDictionary<,>)) is { } dictType && dictType.GetGenericArguments()[0] == typeof(string):
                // ModuleDict<T>.
                var value = dictType.GetGenericArguments()[1];
                CheckAssignable(value, replacement, $"{parent.TypeName()}<{Describe(value)}> at '{parentPath}'", path);
                dictType.GetProperty("Item")!.SetValue(parent, replacement, [name]);
                break;
            default:
                SetFields(parent, name, old, replacement, path);
                break;
        }
        Reregister(parent, name, replacement);
        return old;
    }

    /// <summary>Sets requires_grad on every parameter (recursively); returns the module.</summary>
    public static T requires_grad_<T>(this T module, bool requires_grad = true) where T : nn.Module
    {
        foreach (var p in module.parameters()) p.requires_grad = requires_grad;
        return module;
    }

    /// <summary>The module's class name without generic arity ("Linear", "ModuleList"), for messages.</summary>
    public static string TypeName(this nn.Module module)
    {
        var name = module.GetType().Name;
        var tick = name.IndexOf('`');
        return tick < 0 ? name : name[..tick];
    }

    private static nn.Module? Child(nn.Module parent, string name)
    {
        foreach (var (n, m) in parent.named_children())
            if (n == name) return m;
        return null;
    }

    // The fields holding the old child (any field type: Module<Tensor, Tensor>, an interface, a concrete class); where
    // several do, those named for the child (TorchSharp's [ComponentName] or the field name).
    private static void SetFields(nn.Module parent, string name, nn.Module old, nn.Module replacement, string path)
    {
        var holding = AllFields(parent.GetType()).Where(f => !f.FieldType.IsValueType && ReferenceEquals(f.GetValue(parent), old)).ToList();
        var named = holding.Where(f => f.ComponentName() == name).ToList();
        var targets = named.Count > 0 ? named : holding;
        foreach (var field in targets)
            CheckAssignable(field.FieldType, replacement, $"field {parent.GetType().Name}.{field.Name}", path);
        foreach (var field in targets) field.SetValue(parent, replacement);
    }

    private static void ReplaceInSequential(Sequential sequential, string name, nn.Module old, nn.Module replacement, string path)
    {
        if (replacement is not nn.IModule<Tensor, Tensor> typed)
            throw new InvalidOperationException($"cannot replace '{path}': a Sequential holds Module<Tensor, Tensor>, and {replacement.TypeName()} is not one");
        var modules = (IList)(typeof(Sequential).GetField("_modules", InstanceFields)?.GetValue(sequential)
            ?? throw new InvalidOperationException("TorchSharp's Sequential has no _modules list (TorchSharp version changed?)"));
        var index = -1;
        for (var i = 0; i < modules.Count; i++)
            if (ReferenceEquals(modules[i], old)) index = i;
        if (index < 0) throw new KeyNotFoundException($"no module at '{path}' ('{name}' not in the Sequential's list)");
        modules[index] = typed;
    }

    // register_module(name, null) removes the entry, register_module(name, m) appends it (and registers m's own fields);
    // then the entry is moved back to where the old child was, so parameter order does not change.
    private static void Reregister(nn.Module parent, string name, nn.Module replacement)
    {
        var table = typeof(nn.Module).GetField("_internal_submodules", InstanceFields)?.GetValue(parent) as OrderedDict<string, nn.Module>;
        var position = table?.Keys.ToList().IndexOf(name) ?? -1;
        parent.register_module(name, null!);
        parent.register_module(name, replacement);
        if (table is null || position < 0 || position == table.Count - 1) return;
        table.Remove(name);
        table.Insert(position, (name, replacement));
    }

    private static void CheckAssignable(Type holder, nn.Module replacement, string where, string path)
    {
        if (!holder.IsInstanceOfType(replacement))
            throw new InvalidOperationException(
                $"cannot replace '{path}': {where} is typed {Describe(holder)} and cannot hold a {replacement.TypeName()}. " +
                "Declare swappable children as Module<Tensor, Tensor> (see ENGINE conventions) so adapters can wrap them.");
    }

    private static string Describe(Type t) =>
        t.IsGenericType ? $"{t.Name[..t.Name.IndexOf('`')]}<{string.Join(", ", t.GetGenericArguments().Select(Describe))}>" : t.Name;

    private static IEnumerable<FieldInfo> AllFields(Type? type)
    {
        var seen = new HashSet<string>();
        for (; type is not null && type != typeof(object); type = type.BaseType)
            foreach (var f in type.GetFields(InstanceFields | BindingFlags.DeclaredOnly))
                if (seen.Add(f.Name)) yield return f;
    }

    private static Type? GenericInterface(object o, Type definition) =>
        o.GetType().GetInterfaces().FirstOrDefault(i => i.IsGenericType && i.GetGenericTypeDefinition() == definition);
}
