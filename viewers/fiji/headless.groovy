/*
 * Run a Fiji script that declares `#@` parameters with plain `groovy`, binding them the way
 * `fiji-linux-x64 --headless --run script.groovy 'key="value",other=12'` does. Used by the
 * tests and the benchmark (Fiji itself is not needed); in Fiji, run the script directly.
 *
 *   groovy -cp ij.jar:jeromq.jar headless.groovy polystore_receiver.groovy 'endpoint="tcp://127.0.0.1:5555"'
 *
 * With POLYSTORE_FIJI_GUI=1 (and a display, e.g. under xvfb-run) ImageJ's main window is opened
 * first, so the script takes its GUI path (windows, ROI Manager, Stop button) as in Fiji.
 *
 * Supported: `#@ Type (attr=..., ...) name` with Type String, File, Boolean, Integer, Long,
 * Double (and the primitive spellings). A parameter not given takes its `value=` attribute,
 * else null when `required=false`, else it is an error. The `#@` lines become comments, so
 * line numbers in stack traces stay those of the script.
 */

if (args.length < 1) {
    System.err.println('usage: headless.groovy SCRIPT [\'key="value",key2=value2\']')
    System.exit(2)
}
File script = new File(args[0])
String given = args.length > 1 ? args[1] : ''

/** Split `key="value",key2=bare` like Fiji's --run argument (quoted values may hold commas). */
Map<String, String> parseAssignments(String text) {
    Map<String, String> out = [:]
    int i = 0
    while (i < text.length()) {
        while (i < text.length() && (text[i] == ',' || text[i].trim().isEmpty())) i++
        if (i >= text.length()) break
        int eq = text.indexOf('=', i)
        if (eq < 0) throw new IllegalArgumentException("expected key=value in: ${text.substring(i)}")
        String key = text.substring(i, eq).trim()
        i = eq + 1
        StringBuilder value = new StringBuilder()
        if (i < text.length() && (text[i] == '"' || text[i] == "'")) {
            String q = text[i++]
            while (i < text.length() && text[i] != q) {
                if (text[i] == '\\' && i + 1 < text.length()) i++
                value.append(text[i++])
            }
            if (i >= text.length()) throw new IllegalArgumentException("unterminated quote for ${key}")
            i++
        } else {
            while (i < text.length() && text[i] != ',') value.append(text[i++])
        }
        out[key] = value.toString().trim()
    }
    return out
}

/** Attributes inside `( ... )`: value="x", required=false, choices={"a", "b"}. */
Map<String, String> parseAttributes(String text) {
    Map<String, String> out = [:]
    def m = text =~ /(\w+)\s*=\s*("(?:[^"\\]|\\.)*"|\{[^}]*\}|[^,\s)]+)/
    while (m.find()) {
        String v = m.group(2)
        out[m.group(1)] = v.startsWith('"') ? v[1..-2].replace('\\"', '"') : v
    }
    return out
}

Object convert(String type, String name, String text) {
    if (text == null) return null
    switch (type) {
        case 'String': return text
        case 'File': return new File(text)
        case ['Boolean', 'boolean']:
            if (!(text.toLowerCase() in ['true', 'false'])) throw new IllegalArgumentException("${name} must be true or false, got '${text}'")
            return text.toLowerCase() == 'true'
        case ['Integer', 'int']: return Integer.valueOf(text)
        case ['Long', 'long']: return Long.valueOf(text)
        case ['Double', 'double', 'Float', 'float']: return Double.valueOf(text)
        default: throw new IllegalArgumentException("parameter ${name}: type ${type} is not supported by this launcher")
    }
}

def values = parseAssignments(given)
def binding = new Binding()
def lines = script.readLines('UTF-8')
def declared = [] as Set
for (int k = 0; k < lines.size(); k++) {
    String line = lines[k]
    if (!line.startsWith('#@')) continue
    def m = line =~ /^#@\s*(\w+)\s*(?:\((.*)\))?\s*(\w+)\s*$/
    if (!m.matches()) throw new IllegalArgumentException("${script.name}:${k + 1}: cannot read parameter line: ${line}")
    String type = m.group(1), name = m.group(3)
    Map<String, String> attrs = parseAttributes(m.group(2) ?: '')
    declared << name
    String text = values.containsKey(name) ? values[name] : attrs['value']
    if (text == null && attrs['required'] != 'false') throw new IllegalArgumentException("missing required parameter ${name}")
    if (text != null && attrs['choices']) {
        def choices = (attrs['choices'] =~ /"([^"]*)"/).collect { it[1] }
        if (!(text in choices)) throw new IllegalArgumentException("${name} must be one of ${choices}, got '${text}'")
    }
    binding.setVariable(name, convert(type, name, text))
    lines[k] = '//' + line
}
def unknown = values.keySet() - declared
if (unknown) throw new IllegalArgumentException("unknown parameter(s) ${unknown}; ${script.name} declares ${declared}")

if (this.getBinding().hasVariable('bindOnly')) {  // script_editor.groovy: it runs the script itself
    binding.setVariable('__source__', lines.join('\n'))
    return binding
}
if (System.getenv('POLYSTORE_FIJI_GUI') == '1') {
    new ij.ImageJ()  // IJ.getInstance() != null: the script behaves as inside Fiji's GUI
}
try {
    new GroovyShell(this.class.classLoader, binding).evaluate(lines.join('\n'), script.name)
} catch (Throwable t) {
    System.err.println("${script.name} failed: ${t}")
    if (!(t instanceof IllegalArgumentException)) t.printStackTrace()
    System.exit(1)
}
System.exit(0)  // like Fiji --headless: the JVM ends with the script
