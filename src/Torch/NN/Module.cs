namespace LoRAHub.Torch.NN;

/// <summary>
/// A layer or model: named parameters, buffers and submodules, as in torch.nn.Module.
/// Submodules are looked up by name at forward time, so a method plugin can replace one
/// (e.g. a Linear by a LoRA layer) with <see cref="register_module"/> and the model uses it.
/// </summary>
public abstract class Module : IDisposable
{
    private readonly Dictionary<string, Tensor> parameterTable = new();
    private readonly Dictionary<string, Tensor> bufferTable = new();
    private readonly HashSet<string> nonPersistent = new();
    private readonly Dictionary<string, Module> moduleTable = new();
    // Insertion order (Dictionary does not promise it after removals).
    private readonly List<string> parameterOrder = new(), bufferOrder = new(), moduleOrder = new();

    protected Module(string? typeName = null) => TypeName = typeName ?? GetType().Name;

    public string TypeName { get; }
    public bool training { get; private set; } = true;

    /// <summary>The default single-input forward; modules with other signatures define their own methods.</summary>
    public virtual Tensor forward(Tensor input) =>
        throw new NotSupportedException($"{TypeName} has no single-tensor forward");

    public Tensor call(Tensor input) => forward(input);

    // ---- registration ----

    public Tensor register_parameter(string name, Tensor tensor, bool requires_grad = true)
    {
        CheckName(name);
        tensor.DetachFromDisposeScope();
        if (tensor.requires_grad != requires_grad) tensor.requires_grad = requires_grad;
        if (!parameterTable.ContainsKey(name)) parameterOrder.Add(name);
        parameterTable[name] = tensor;
        return tensor;
    }

    public Tensor register_buffer(string name, Tensor tensor, bool persistent = true)
    {
        CheckName(name);
        tensor.DetachFromDisposeScope();
        if (!bufferTable.ContainsKey(name)) bufferOrder.Add(name);
        bufferTable[name] = tensor;
        if (persistent) nonPersistent.Remove(name); else nonPersistent.Add(name);
        return tensor;
    }

    /// <summary>Adds or replaces a submodule.</summary>
    public T register_module<T>(string name, T module) where T : Module
    {
        CheckName(name);
        if (!moduleTable.ContainsKey(name)) moduleOrder.Add(name);
        moduleTable[name] = module;
        return module;
    }

    public bool remove_parameter(string name)
    {
        parameterOrder.Remove(name);
        return parameterTable.Remove(name);
    }

    private static void CheckName(string name)
    {
        if (string.IsNullOrEmpty(name) || name.Contains('.'))
            throw new ArgumentException($"invalid attribute name '{name}': names must be non-empty and contain no '.'");
    }

    protected Tensor Parameter(string name) =>
        parameterTable.TryGetValue(name, out var p) ? p : throw new KeyNotFoundException($"{TypeName} has no parameter '{name}'");

    protected Tensor? OptionalParameter(string name) => parameterTable.GetValueOrDefault(name);

    protected Tensor Buffer(string name) =>
        bufferTable.TryGetValue(name, out var b) ? b : throw new KeyNotFoundException($"{TypeName} has no buffer '{name}'");

    protected T Child<T>(string name) where T : Module =>
        moduleTable.TryGetValue(name, out var m)
            ? m as T ?? throw new InvalidCastException($"{TypeName}.{name} is a {m.TypeName}, not a {typeof(T).Name}")
            : throw new KeyNotFoundException($"{TypeName} has no submodule '{name}'");

    // ---- traversal ----

    public IEnumerable<(string name, Module module)> named_children() => moduleOrder.Select(n => (n, moduleTable[n]));

    public IEnumerable<Module> children() => named_children().Select(c => c.module);

    /// <summary>This module ("") and every descendant, with dotted paths.</summary>
    public IEnumerable<(string name, Module module)> named_modules(string prefix = "")
    {
        yield return (prefix, this);
        foreach (var (n, m) in named_children())
            foreach (var item in m.named_modules(Join(prefix, n)))
                yield return item;
    }

    public IEnumerable<(string name, Tensor parameter)> named_parameters(bool recurse = true) => NamedTensors(recurse, parameters: true, "");

    public IEnumerable<Tensor> parameters(bool recurse = true) => named_parameters(recurse).Select(p => p.parameter);

    public IEnumerable<(string name, Tensor buffer)> named_buffers(bool recurse = true) => NamedTensors(recurse, parameters: false, "");

    private IEnumerable<(string, Tensor)> NamedTensors(bool recurse, bool parameters, string prefix)
    {
        var order = parameters ? parameterOrder : bufferOrder;
        var table = parameters ? parameterTable : bufferTable;
        foreach (var n in order) yield return (Join(prefix, n), table[n]);
        if (!recurse) yield break;
        foreach (var (n, m) in named_children())
            foreach (var item in m.NamedTensors(true, parameters, Join(prefix, n)))
                yield return item;
    }

    private static string Join(string prefix, string name) => prefix.Length == 0 ? name : prefix + "." + name;

    /// <summary>The module at a dotted path ("model.layers.0.self_attn"), or null.</summary>
    public Module? get_submodule(string path)
    {
        Module current = this;
        if (path.Length == 0) return current;
        foreach (var part in path.Split('.'))
            if (!current.moduleTable.TryGetValue(part, out current!)) return null;
        return current;
    }

    /// <summary>Replaces the module at a dotted path; returns the module it replaced.</summary>
    public Module replace_submodule(string path, Module replacement)
    {
        var dot = path.LastIndexOf('.');
        var parent = dot < 0 ? this : get_submodule(path[..dot]) ?? throw new KeyNotFoundException($"no module at '{path[..dot]}'");
        var name = dot < 0 ? path : path[(dot + 1)..];
        if (!parent.moduleTable.TryGetValue(name, out var old)) throw new KeyNotFoundException($"no module at '{path}'");
        parent.register_module(name, replacement);
        return old;
    }

    // ---- state ----

    /// <summary>Parameters and persistent buffers by dotted name. The tensors are the module's own: do not dispose them.</summary>
    public Dictionary<string, Tensor> state_dict()
    {
        var result = new Dictionary<string, Tensor>();
        foreach (var (n, p) in named_parameters()) result[n] = p;
        foreach (var (path, m) in named_modules())
            foreach (var b in m.bufferOrder)
                if (!m.nonPersistent.Contains(b)) result[Join(path, b)] = m.bufferTable[b];
        return result;
    }

    /// <summary>
    /// Copies values into the module's tensors (converting dtype and device). With strict, missing or unexpected
    /// keys are an error; a shape mismatch is always an error naming the key and both shapes.
    /// </summary>
    public (List<string> missing, List<string> unexpected) load_state_dict(IReadOnlyDictionary<string, Tensor> source, bool strict = true)
    {
        var own = state_dict();
        var missing = own.Keys.Where(k => !source.ContainsKey(k)).ToList();
        var unexpected = source.Keys.Where(k => !own.ContainsKey(k)).ToList();
        if (strict && (missing.Count > 0 || unexpected.Count > 0))
            throw new InvalidOperationException(
                $"load_state_dict for {TypeName}: missing keys [{string.Join(", ", missing.Take(10))}{(missing.Count > 10 ? ", ..." : "")}], " +
                $"unexpected keys [{string.Join(", ", unexpected.Take(10))}{(unexpected.Count > 10 ? ", ..." : "")}]. " +
                "Check that the checkpoint matches the model configuration, or pass strict: false.");
        using var _ = torch.no_grad();
        foreach (var (key, target) in own)
        {
            if (!source.TryGetValue(key, out var value)) continue;
            if (!value.shape.SequenceEqual(target.shape))
                throw new InvalidOperationException($"shape mismatch for '{key}': the checkpoint has {value.ShapeString}, the model expects {target.ShapeString}");
            target.copy_(value);
        }
        return (missing, unexpected);
    }

    // ---- mode and placement ----

    public virtual Module train(bool mode = true)
    {
        training = mode;
        foreach (var m in children()) m.train(mode);
        return this;
    }

    public Module eval() => train(false);

    /// <summary>Moves (and optionally casts floating-point) parameters and buffers in place, keeping tensor identity.</summary>
    public Module to(Device device, ScalarType? dtype = null)
    {
        using var _ = torch.no_grad();
        foreach (var (_, m) in named_modules())
        {
            foreach (var t in m.parameterTable.Values.Concat(m.bufferTable.Values))
            {
                var type = dtype.HasValue && t.dtype.IsFloatingPoint() ? dtype.Value : t.dtype;
                if (t.device == device && t.dtype == type) continue;
                using var moved = t.to(device, type);
                t.set_data(moved);
            }
        }
        return this;
    }

    public Module to(ScalarType dtype) => to(parameters(true).FirstOrDefault()?.device ?? Device.CPU, dtype);

    /// <summary>Sets every parameter's requires_grad.</summary>
    public Module requires_grad_(bool value)
    {
        foreach (var p in parameters()) p.requires_grad = value;
        return this;
    }

    /// <summary>Frees every parameter and buffer of this module and its descendants.</summary>
    public virtual void Dispose()
    {
        foreach (var (_, m) in named_modules())
        {
            foreach (var t in m.parameterTable.Values) t.Dispose();
            foreach (var t in m.bufferTable.Values) t.Dispose();
        }
        GC.SuppressFinalize(this);
    }

    public override string ToString() => TypeName;
}
