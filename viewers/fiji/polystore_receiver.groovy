#@ String (label="Endpoint", value="tcp://127.0.0.1:55556", description="tcp://HOST:PORT to listen on (loopback only unless remote senders are allowed); port 0 picks a free port") endpoint
#@ String (label="Frames without axes or mode hint", choices={"replace", "stack"}, value="replace", description="replace: each frame replaces its window's image; stack: each frame is appended as the next time point") mode
#@ String (label="Multichannel display", choices={"composite", "color", "grayscale"}, value="composite") channel_display
#@ File (label="Output directory (optional)", style="directory", required=false, description="If set, every 'report' request also saves each image as <title>.tif and writes report.json here") output_dir
#@ Boolean (label="Add ROIs to the ROI Manager (needs a display)", value=true) roi_manager
#@ Boolean (label="Allow remote senders (listen beyond 127.0.0.1)", value=false) allow_remote
#@ Boolean (label="Allow unauthenticated senders (JeroMQ 0.3 only: any local account could send)", value=false) allow_unauthenticated
#@ Boolean (label="Stop when standard input closes (headless use)", value=false) stop_on_stdin_eof
#@ Integer (label="Most senders at once", value=1024, description="At this many, a new sender takes the place of the one heard from least recently (one that died without saying bye)") max_senders

/*
 * polystore receiver for Fiji / ImageJ: frames saved with backend="fiji_stream" become images.
 *
 * Speaks wire protocol v1 (docs/protocol.md, mirrored in polystore/streaming/protocol.py and
 * polystore/streaming/receiver.py): a JeroMQ ROUTER socket on tcp://127.0.0.1, a hello/welcome
 * handshake with a shared-memory probe, every header validated in the order protocol.md gives
 * ("Validation"), pixels copied straight out of /dev/shm/<segment> through a read-only memory
 * map (or out of the message for inline frames), and the `ack` (the sender's credit) sent once
 * the copy is done (acks of frames already waiting behind it go together), before anything
 * is drawn. A bad message gets an `error` reply;
 * nothing a message contains stops this script. Installation and use: docs/fiji.md.
 *
 * Type mapping (dtype on the wire -> ImageJ image type):
 *   uint8   -> 8-bit  (exact)         uint16 -> 16-bit (exact)         float32 -> 32-bit (exact)
 *   int8, int16, float16                        -> 32-bit float, exact
 *   uint32, int32                               -> 32-bit float, exact up to |v| = 2^24, then
 *                                                  rounded to the nearest float32
 *   uint64, int64, float64                      -> 32-bit float, rounded to the nearest float32
 *                                                  (float64 beyond +-3.4e38 becomes +-Infinity)
 *   display.kind == "labels": 16-bit when every value is an integer in 0..65535 (uint8/uint16
 *   always), else 32-bit float; shown with a glasbey LUT (Fiji's glasbey_on_dark.lut when
 *   present, else an equivalent built here), display range 0..max(255, largest label).
 *   A stream keeps one type: a frame of another dtype starts its image again (docs/protocol.md,
 *   "Modes"); labels that outgrow 16 bits within one dtype turn it into 32-bit float.
 *
 * Windows and axes: one ImagePlus per stream key, titled with the key. The last two dims of
 * `shape` are (rows, columns) = (height, width). `axes` keys c, z and t (and their synonyms in
 * any case: channel(s), slice(s), time, frame(s)..., docs/protocol.md) place the frame in a hyperstack (setDimensions(c, z, t)) that grows as needed,
 * reusing its pixel arrays (the ImagePlus is never re-created per frame; it becomes a
 * CompositeImage once, when a second channel appears). Any other axis name is folded into the
 * window title ("stream [p=3]"), since ImageJ has no more dimensions. A frame's own leading
 * dims are named by the entries of `axis_names` that are not keys of `axes`, else by default
 * (1 dim: z; 2: c, z; 3: t, c, z); more than ImageJ's c/z/t can hold is answered `bad_shape`.
 * A frame's display.mode wins; without one, frames with axes (any names) are placed and the others
 * follow the `mode` parameter: `replace` (the window shows just this frame) or `stack`
 * (appended as the next time point); `place` without axes replaces. A stream whose frames
 * change mode, kind, dtype or shape starts again (docs/protocol.md, as napari). Empty frames (a 0 in shape) are acknowledged and counted, not shown. A frame
 * whose placement would not fit into the Java heap (say `t: 999999`) is answered `too_large`
 * before anything changes. If the user closes a window or changes an image in Fiji, the next
 * frame opens a new window or goes on from the changed image.
 *
 * Display hints: colormap (gray, red, green, blue, cyan, magenta, yellow, fire, ice, spectrum,
 * glasbey, or any LUT file Fiji has, e.g. viridis via mpl-viridis.lut) applies to the
 * channel(s) the frame covers; contrast_limits sets their display range; opacity is ignored.
 *
 * ROIs (`rois` messages): polygon, rectangle, ellipse, line and point become ImageJ ROIs at
 * x = column, y = row, positioned (c, z, t) by the message's axes (unset axes = all), named by
 * their label (else "<path>#<n>"). They go to the image's Overlay (saved with its TIFF) and, when
 * Fiji has a display, also to the ROI Manager. ROIs sent again for the same path and position
 * replace the earlier ones; ROIs for a stream that has no image yet wait for its first frame.
 *
 * Control: `report` answers a `report` message (counters plus one entry per image) and, with an
 * output directory, saves every image as TIFF and writes report.json there first; `clear`
 * closes every image and answers `ack`; `bye` forgets the sender and unmaps its segments.
 * Headless it stops on SIGTERM (or when stdin closes, if asked); in Fiji, with its Stop button.
 */

// ==========================================================================================
// Bootstrap. The receiver itself (viewers/fiji/src/receiver_body.groovy in the polystore
// source) is embedded at the end of this file as text, so Fiji compiles only these few lines.
// Compiling the receiver takes Groovy 4 most of ten seconds, so it is compiled once per version
// into a per-user cache, ${XDG_CACHE_HOME:-~/.cache}/polystore/fiji/<key>, and later runs load
// its classes from there. <key> is the SHA-256 of the receiver's text, the Groovy, Java and
// ImageJ versions: classes made by one Groovy or Java are never loaded by another. Only a
// cache of this user that no other account can write is used (else: compiled in memory, as
// before, with a line saying why). Deleting that folder clears it. docs/fiji.md, "Start-up time".
// Generated by scripts/gen_groovy_protocol.py from viewers/fiji/src/; edit those files.
// ==========================================================================================

import groovy.transform.CompileStatic
import org.codehaus.groovy.control.CompilationFailedException
import org.codehaus.groovy.control.CompilationUnit
import org.codehaus.groovy.control.CompilerConfiguration
import org.codehaus.groovy.runtime.InvokerHelper

import java.nio.charset.StandardCharsets
import java.nio.file.DirectoryStream
import java.nio.file.FileSystems
import java.nio.file.Files
import java.nio.file.LinkOption
import java.nio.file.Path
import java.nio.file.Paths
import java.nio.file.StandardCopyOption
import java.nio.file.attribute.FileTime
import java.nio.file.attribute.PosixFilePermissions
import java.security.MessageDigest

/** Defines the receiver's classes from bytes read and checked up front; the rest from `parent`. */
@CompileStatic
class PolystoreBodyLoader extends ClassLoader {
    private final Map<String, byte[]> classes

    PolystoreBodyLoader(ClassLoader parent, Map<String, byte[]> classes) {
        super(parent)
        this.classes = classes
    }

    @Override
    protected Class<?> loadClass(String name, boolean resolve) throws ClassNotFoundException {
        synchronized (getClassLoadingLock(name)) {
            Class<?> c = findLoadedClass(name)
            if (c == null) {
                byte[] b = classes.get(name)
                if (b == null) return super.loadClass(name, resolve)
                c = defineClass(name, b, 0, b.length)
            }
            if (resolve) resolveClass(c)
            return c
        }
    }
}

/** A cache that must not be used (another account could write it); the message says why. */
@CompileStatic
class PolystoreCacheRefused extends Exception {
    PolystoreCacheRefused(String message) { super(message) }
}

/** A cache entry that is not what was stored (missing or changed files): compiled again. */
@CompileStatic
class PolystoreCacheDamaged extends Exception {
    PolystoreCacheDamaged(String message) { super(message) }
}

@CompileStatic
class PolystoreCompileCache {
    static final String MAIN = 'receiver_body'  // the receiver's script class
    static final String SOURCE = MAIN + '.groovy'  // the name stack traces show
    static final String MANIFEST = 'manifest.txt'
    static final String FORMAT = 'polystore-fiji compile cache 1'
    static final int KEEP = 3  // entries kept, most recently used first (each about 0.5 MB)
    static final long STALE_TMP_MS = 3600_000L  // a compile left behind this long ago died

    /** The receiver's script class: from the cache, compiled into it, or compiled in memory. */
    static Class receiver(String text, ClassLoader parent, Closure say) {
        try {
            Path root = root()
            Path entry = root.resolve(key(text))
            if (Files.exists(entry, LinkOption.NOFOLLOW_LINKS)) {
                check(entry)
                try {
                    Class c = load(entry, parent)
                    try {  // marks it as used, for prune()
                        Files.setLastModifiedTime(entry, FileTime.fromMillis(System.currentTimeMillis()))
                    } catch (IOException ignored) {
                        // a read-only cache still serves
                    }
                    say.call("loaded the receiver from the compile cache ${entry}".toString())
                    return c
                } catch (PolystoreCacheDamaged e) {
                    say.call("the compile cache entry ${entry} is damaged (${e.message}); compiling it again".toString())
                    discard(root, entry)
                }
            }
            long t0 = System.nanoTime()
            boolean mine = compileInto(root, entry, text, parent)
            check(entry)
            Class c = load(entry, parent)
            if (mine) {
                say.call(String.format('compiled the receiver into %s (first run of this version, %.1f s)', entry, (System.nanoTime() - t0) / 1e9d))
                prune(root, entry)
            } else {
                say.call("loaded the receiver from the compile cache ${entry} (another run compiled it at the same time)".toString())
            }
            return c
        } catch (CompilationFailedException e) {
            throw e  // an error in the receiver itself: compiling it in memory would repeat it
        } catch (PolystoreCacheRefused e) {
            say.call("not using the compile cache: ${e.message}; compiling the receiver in memory".toString())
        } catch (Exception e) {
            // Kill (interrupt) while compiling: stop, do not compile all over again in memory
            if (e instanceof java.nio.channels.ClosedByInterruptException || Thread.currentThread().isInterrupted()) throw e
            say.call("the compile cache failed (${e}); compiling the receiver in memory".toString())
        }
        return new GroovyClassLoader(parent).parseClass(text, SOURCE)
    }

    static Path root() throws IOException, PolystoreCacheRefused {
        String xdg = System.getenv('XDG_CACHE_HOME')
        Path base = xdg && Paths.get(xdg).isAbsolute() ? Paths.get(xdg) : Paths.get(System.getProperty('user.home'), '.cache')
        Path polystore = base.resolve('polystore')
        Path root = polystore.resolve('fiji')
        if (!posix()) {
            Files.createDirectories(root)
            return root
        }
        for (Path dir : [base, polystore, root]) {  // each checked before anything is made in it
            if (!Files.exists(dir, LinkOption.NOFOLLOW_LINKS)) {
                try {
                    Files.createDirectories(dir, PosixFilePermissions.asFileAttribute(PosixFilePermissions.fromString('rwx------')))
                } catch (java.nio.file.FileAlreadyExistsException ignored) {
                    // made by another run just now: checked below like any other
                }
            }
            if (dir != base) check(dir)
        }
        return root
    }

    static boolean posix() {
        return FileSystems.getDefault().supportedFileAttributeViews().contains('posix')
    }

    /** Refuses a directory that is a link, another account's, or writable by group or others. */
    static void check(Path dir) throws IOException, PolystoreCacheRefused {
        if (!posix()) return  // no owners or modes to check (Windows): it is the user's profile
        Map<String, Object> a = Files.readAttributes(dir, 'unix:uid,mode,isDirectory,isSymbolicLink', LinkOption.NOFOLLOW_LINKS)
        if (a.get('isSymbolicLink') || !a.get('isDirectory')) throw new PolystoreCacheRefused("${dir} is not a directory (a symbolic link?)".toString())
        Object me = ownUid()
        if (me == null) throw new PolystoreCacheRefused('cannot tell which user this is')
        if (a.get('uid') != me) throw new PolystoreCacheRefused("${dir} belongs to another user (uid ${a.get('uid')}, not ${me})".toString())
        if ((((Integer) a.get('mode')) & 022) != 0) throw new PolystoreCacheRefused("${dir} can be written by other accounts (chmod 700 ${dir})".toString())
    }

    static Object ownUid() {
        try {  // the JDK's own answer (module jdk.security.auth; there on Linux and macOS)
            Object unix = Class.forName('com.sun.security.auth.module.UnixSystem').getDeclaredConstructor().newInstance()
            return ((Long) unix.getClass().getMethod('getUid').invoke(unix)).intValue()
        } catch (Exception ignored) {
        }
        try {
            return Files.getAttribute(Paths.get('/proc/self'), 'unix:uid')
        } catch (Exception ignored) {
            return null
        }
    }

    static String key(String text) {
        String versions = [GroovySystem.getVersion(), System.getProperty('java.specification.version'),
                           ij.ImageJ.VERSION + ij.ImageJ.BUILD, FORMAT].join('\n')
        return hex(sha256((text + '\n' + versions).getBytes(StandardCharsets.UTF_8)))
    }

    static byte[] sha256(byte[] data) {
        return MessageDigest.getInstance('SHA-256').digest(data)
    }

    static String hex(byte[] bytes) {
        StringBuilder s = new StringBuilder(bytes.length * 2)
        for (byte b : bytes) s.append(String.format('%02x', b & 0xff))
        return s.toString()
    }

    /** Compiles into a new directory beside `entry` and renames it to `entry` in one step;
     *  false if another run did that first (its entry is used, this one deleted). */
    static boolean compileInto(Path root, Path entry, String text, ClassLoader parent) throws IOException {
        Path tmp = posix()
                ? Files.createTempDirectory(root, 'tmp-', PosixFilePermissions.asFileAttribute(PosixFilePermissions.fromString('rwx------')))
                : Files.createTempDirectory(root, 'tmp-')
        try {
            CompilerConfiguration config = new CompilerConfiguration()
            config.setTargetDirectory(tmp.toFile())
            CompilationUnit unit = new CompilationUnit(config, null, new GroovyClassLoader(parent, config))
            unit.addSource(SOURCE, text)
            unit.compile()
            StringBuilder manifest = new StringBuilder(FORMAT).append('\n')
            for (Path f : list(tmp)) {
                String name = f.getFileName().toString()
                if (!name.endsWith('.class') || !Files.isRegularFile(f, LinkOption.NOFOLLOW_LINKS)) throw new IOException("unexpected compiler output ${f}")
                manifest.append(hex(sha256(Files.readAllBytes(f)))).append(' ').append(name[0..-7]).append('\n')
            }
            Files.write(tmp.resolve(MANIFEST), manifest.toString().getBytes(StandardCharsets.UTF_8))
            try {
                Files.move(tmp, entry, StandardCopyOption.ATOMIC_MOVE)
                return true
            } catch (IOException e) {
                if (Files.isDirectory(entry, LinkOption.NOFOLLOW_LINKS)) return false  // another run won
                throw e
            }
        } finally {
            if (Files.exists(tmp, LinkOption.NOFOLLOW_LINKS)) delete(tmp)
        }
    }

    /** The main class of `entry`, every class file checked against its manifest first. */
    static Class load(Path entry, ClassLoader parent) throws PolystoreCacheDamaged {
        Map<String, byte[]> classes = [:]
        try {
            List<String> lines = new String(Files.readAllBytes(entry.resolve(MANIFEST)), StandardCharsets.UTF_8).split('\n') as List<String>
            if (lines.isEmpty() || lines[0] != FORMAT) throw new PolystoreCacheDamaged('unknown manifest')
            for (String line : lines.subList(1, lines.size())) {
                String[] parts = line.split(' ')
                if (parts.length != 2 || !(parts[1] ==~ /[A-Za-z0-9_$]+/)) throw new PolystoreCacheDamaged("bad manifest line '${line}'".toString())
                byte[] b = Files.readAllBytes(entry.resolve(parts[1] + '.class'))
                if (hex(sha256(b)) != parts[0]) throw new PolystoreCacheDamaged("${parts[1]}.class changed".toString())
                classes.put(parts[1], b)
            }
        } catch (IOException e) {
            throw new PolystoreCacheDamaged(e.toString())
        }
        if (!classes.containsKey(MAIN)) throw new PolystoreCacheDamaged("no ${MAIN}.class".toString())
        try {
            return new PolystoreBodyLoader(parent, classes).loadClass(MAIN)
        } catch (ClassNotFoundException | LinkageError e) {
            throw new PolystoreCacheDamaged(e.toString())
        }
    }

    /** Keeps the KEEP most recently used entries and removes compiles that died. */
    static void prune(Path root, Path keep) {
        try {
            List<Path> entries = []
            long now = System.currentTimeMillis()
            for (Path p : list(root)) {
                String name = p.getFileName().toString()
                long modified = Files.getLastModifiedTime(p, LinkOption.NOFOLLOW_LINKS).toMillis()
                if (name ==~ /[0-9a-f]{64}/ && p != keep) entries << p
                else if (name.startsWith('tmp-') && now - modified > STALE_TMP_MS) delete(p)
            }
            entries.sort { Path p -> -Files.getLastModifiedTime(p, LinkOption.NOFOLLOW_LINKS).toMillis() }
            for (Path old : entries.drop(KEEP - 1)) discard(root, old)
        } catch (IOException ignored) {
            // another run pruning at the same time; the next compile tries again
        }
    }

    /** Renames `entry` away first, so no run ever sees it half deleted. */
    static void discard(Path root, Path entry) throws IOException {
        Path gone = root.resolve("tmp-gone-${Long.toHexString(new Random().nextLong())}".toString())
        Files.move(entry, gone, StandardCopyOption.ATOMIC_MOVE)
        delete(gone)
    }

    static void delete(Path p) throws IOException {
        if (Files.isDirectory(p, LinkOption.NOFOLLOW_LINKS)) for (Path f : list(p)) delete(f)
        Files.deleteIfExists(p)
    }

    static List<Path> list(Path dir) throws IOException {
        List<Path> out = []
        DirectoryStream<Path> stream = Files.newDirectoryStream(dir)
        try {
            for (Path p : stream) out << p
        } finally {
            stream.close()
        }
        return out
    }
}

// Fiji's `#@` parameters are variables of this script's binding; the receiver gets the same
// binding and runs in this thread, so the Script Editor's Kill reaches it as before.
boolean polystoreGui = !java.awt.GraphicsEnvironment.isHeadless() && ij.IJ.getInstance() != null
Class polystoreReceiver = PolystoreCompileCache.receiver(receiverSource(), this.class.classLoader, { String msg ->
    println "polystore-fiji: ${msg}"
    System.out.flush()
    if (polystoreGui) ij.IJ.log("polystore: ${msg}")
})
return InvokerHelper.createScript(polystoreReceiver, binding).run()

// The receiver's source (viewers/fiji/src/receiver_body.groovy) as 5 string constants (a class file constant
// holds at most 64 KiB). Generated by scripts/gen_groovy_protocol.py: do not edit.
String receiverSource() {
    StringBuilder s = new StringBuilder(148569)
    s.append('''/*
 * The polystore receiver for Fiji: everything but the `#@` parameters and the header comment,
 * which are in receiver_head.groovy. Edit this file, then run `python scripts/gen_groovy_protocol.py`:
 * it writes the protocol tables below and embeds this file, as text, into the one file users
 * install, viewers/fiji/polystore_receiver.groovy, whose bootstrap (bootstrap.groovy) compiles it
 * once into a per-user cache and runs it with the script\'s binding (docs/fiji.md, "Start-up time").
 */

import groovy.transform.CompileStatic
import ij.CompositeImage
import ij.IJ
import ij.ImagePlus
import ij.ImageStack
import ij.gui.Line
import ij.gui.OvalRoi
import ij.gui.Overlay
import ij.gui.PointRoi
import ij.gui.PolygonRoi
import ij.gui.Roi
import ij.io.FileSaver
import ij.plugin.LutLoader
import ij.process.FloatPolygon
import ij.process.LUT

import java.awt.GraphicsEnvironment
import java.awt.image.IndexColorModel
import java.lang.management.ManagementFactory
import java.lang.reflect.Method
import java.nio.Buffer
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.nio.MappedByteBuffer
import java.nio.channels.FileChannel
import java.nio.charset.CharacterCodingException
import java.nio.charset.CodingErrorAction
import java.nio.charset.StandardCharsets
import java.nio.file.Files
import java.nio.file.LinkOption
import java.nio.file.NoSuchFileException
import java.nio.file.Path
import java.nio.file.Paths
import java.nio.file.StandardCopyOption
import java.nio.file.StandardOpenOption
import java.util.concurrent.CountDownLatch
import java.util.concurrent.TimeUnit
import java.util.concurrent.atomic.AtomicBoolean
import java.util.regex.Pattern

// ==========================================================================================
// 1. Messages (protocol.md: Common fields, Sender -> receiver, Receiver -> sender, Error codes,
//    Validation steps 1-4 and 6); the mirror of polystore/streaming/protocol.py and checks.py
// ==========================================================================================

/** What this receiver adds to the protocol\'s constants (those are in the generated class P). */
@CompileStatic
class Local {
    // A Java array and a MappedByteBuffer hold < 2^31 elements, so this receiver accepts frames
    // a little under the protocol\'s 2 GiB default; it says so in `welcome`.
    static final long MAX_FRAME_BYTES = (1L << 31) - (1L << 20)
    static final int MAX_SENDERS = 1024
    static final String VIEWER = \'fiji\'
    static final String SHM_PREFIX = \'fiji_\'  // FijiStreamingBackend.SHM_PREFIX
}

// >>> BEGIN GENERATED by scripts/gen_groovy_protocol.py from polystore/streaming/protocol.py
// Do not edit by hand: change protocol.py, then run `python scripts/gen_groovy_protocol.py`
// (tests/test_fiji.py fails while this section and protocol.py disagree).

/** Protocol v1 constants, error codes and receiver -> sender messages (protocol.py). */
@CompileStatic
class P {
    static final Map<String, String> AXIS_SYNONYMS = [c: \'c\', ch: \'c\', channel: \'c\', channels: \'c\', z: \'z\', slice: \'z\', slices: \'z\', depth: \'z\', t: \'t\', time: \'t\', frame: \'t\', frames: \'t\', timepoint: \'t\', timepoints: \'t\']
    static final int VERSION = 1
    static final List<Long> SUPPORTED_VERSIONS = [1L]
    static final int MAX_HEADER_BYTES = 65536
    static final long MAX_FRAME_BYTES = 2147483648L
    static final int MAX_NDIM = 8
    static final int MAX_DIM = 2147483647
    static final int MAX_ROIS = 100000
    static final Map<String, Integer> DTYPES = [uint8: 1, int8: 1, uint16: 2, int16: 2, uint32: 4, int32: 4, uint64: 8, int64: 8, float16: 2, float32: 4, float64: 8] as LinkedHashMap
    static final Map<String, int[]> ROI_POINT_COUNTS = [rectangle: [2, 2] as int[], ellipse: [2, 2] as int[], line: [2, 100000] as int[], point: [1, 100000] as int[]]

    // Error codes (docs/protocol.md, "Errors").
    static final String BAD_JSON = \'bad_json\'
    static final String BAD_MESSAGE = \'bad_message\'
    static final String UNSUPPORTED_VERSION = \'unsupported_version\'
    static final String HELLO_REQUIRED = \'hello_required\'
    static final String BAD_SEGMENT = \'bad_segment\'
    static final String SEGMENT_MISSING = \'segment_missing\'
    static final String TOO_LARGE = \'too_large\'
    static final String BAD_SHAPE = \'bad_shape\'
    static final String INTERNAL = \'internal\'
    static final List<String> ERROR_CODES = [\'bad_json\', \'bad_message\', \'unsupported_version\', \'hello_required\', \'bad_segment\', \'segment_missing\', \'too_large\', \'bad_shape\', \'internal\']

    // Receiver -> sender messages, each built here only.
    static Map welcome(Object receiver, Object viewer, Object pid, Object shm, Object max_frame_bytes) {
        [v: VERSION, type: \'welcome\', receiver: receiver, viewer: viewer, pid: pid, shm: shm, max_frame_bytes: max_frame_bytes] as Map
    }
    static Map ack(Object seq) {
        [v: VERSION, type: \'ack\', seq: seq] as Map
    }
    static Map ack(Object seq, Object also) {
        Map message = ack(seq)
        if (also != []) message.put(\'also\', also)
        return message
    }
    static Map error(Object seq, Object code, Object message) {
        [v: VERSION, type: \'error\', seq: seq, code: code, message: message] as Map
    }
    static Map report(Object seq, Object state) {
        [v: VERSION, type: \'report\', seq: seq, state: state] as Map
    }
}

/** The fields of every sender -> receiver message (protocol.py\'s structs): name, check, default. */
@CompileStatic
class Fields {
    static final List<Fld> PROBE = [
        Fld.req(\'segment\', Check.string(0, 2147483647, Pattern.compile(\'[A-Za-z0-9_]{1,240}\'))),
        Fld.req(\'token\', Check.string(0, 2147483647, Pattern.compile(\'[A-Za-z0-9]{1,32}\'))),
    ]
    static final List<Fld> HELLO = [
        Fld.req(\'v\', Check.integer(null, null)),
        Fld.req(\'sender\', Check.string(0, 2147483647, Pattern.compile(\'[A-Za-z0-9]{1,32}\'))),
        Fld.req(\'pid\', Check.integer(0L, null)),
        Fld.req(\'viewer\', Check.string(0, 64)),
        Fld.req(\'segment_prefix\', Check.string(0, 2147483647, Pattern.compile(\'[A-Za-z0-9_]{1,240}\'))),
        Fld.opt(\'versions\', Check.listOf(Check.integer(null, null), 0, 2147483647), [1L]),
        Fld.opt(\'probe\', Check.nullable(Check.struct(PROBE)), null),
        Fld.opt(\'batch_acks\', Check.bool(), false),
    ]
    static final List<Fld> DISPLAY = [
        Fld.opt(\'kind\', Check.oneOf([\'image\', \'labels\']), \'image\'),
        Fld.opt(\'colormap\', Check.nullable(Check.string(0, 64)), null),
        Fld.opt(\'contrast_limits\', Check.nullable(Check.listOf(Check.number(null, null), 2, 2)), null),
        Fld.opt(\'mode\', Check.nullable(Check.oneOf([\'place\', \'replace\', \'stack\'])), null),
        Fld.opt(\'opacity\', Check.nullable(Check.number(0.0d, 1.0d)), null),
        Fld.opt(\'rgb\', Check.nullable(Check.bool()), null),
    ]
    static final List<Fld> FRAME = [
        Fld.req(\'v\', Check.integer(null, null)),
        Fld.req(\'seq\', Check.integer(0L, null)),
        Fld.req(\'stream\', Check.string(1, 256)),
        Fld.req(\'path\', Check.string(0, 4096)),
        Fld.req(\'shape\', Check.listOf(Check.integer(0L, 2147483647L), 1, 8)),
        Fld.req(\'dtype\', Check.oneOf([\'float16\', \'float32\', \'float64\', \'int16\', \'int32\', \'int64\', \'int8\', \'uint16\', \'uint32\', \'uint64\', \'uint8\'])),
        Fld.req(\'nbytes\', Check.integer(0L, null)),
        Fld.req(\'sent_ns\', Check.integer(0L, null)),
        Fld.opt(\'segment\', Check.nullable(Check.string(0, 2147483647, Pattern.compile(\'[A-Za-z0-9_]{1,240}\'))), null),
        Fld.opt(\'offset\', Check.integer(0L, null), 0L),
        Fld.opt(\'axes\', Check.dictOf(Check.string(1, 32), Check.integer(0L, 1000000L), 6), [:]),
        Fld.opt(\'axis_names\', Check.nullable(Check.listOf(Check.string(1, 32), 0, 6)), null),
        Fld.opt(\'display\', Check.struct(DISPLAY), Fld.decode([:], DISPLAY, new At(null, \'display\'))),
        Fld.opt(\'dropped\', Check.integer(0L, null), 0L),
    ]
    static final List<Fld> ROI = [
        Fld.req(\'kind\', Check.oneOf([\'ellipse\', \'line\', \'point\', \'polygon\', \'rectangle\'])),
        Fld.req(\'coords\', Check.listOf(Check.listOf(Check.number(null, null), 2, 2), 1, 100000)),
        Fld.opt(\'label\', Check.nullable(Check.string(0, 256)), null),
    ]
    static final List<Fld> ROIS = [
        Fld.req(\'v\', Check.integer(null, null)),
        Fld.req(\'seq\', Check.integer(0L, null)),
        Fld.req(\'stream\', Check.string(1, 256)),
        Fld.req(\'path\', Check.string(0, 4096)),
        Fld.req(\'sent_ns\', Check.integer(0L, null)),
        Fld.req(\'rois\', Check.listOf(Check.struct(ROI), 0, 100000)),
        Fld.opt(\'axes\', Check.dictOf(Check.string(1, 32), Check.integer(0L, 1000000L), 6), [:]),
        Fld.opt(\'axis_names\', Check.nullable(Check.listOf(Check.string(1, 32), 0, 6)), null),
    ]
    static final List<Fld> CONTROL = [
        Fld.req(\'v\', Check.integer(null, null)),
        Fld.req(\'seq\', Check.integer(0L, null)),
        Fld.req(\'command\', Check.oneOf([\'clear\', \'report\'])),
    ]
    static final List<Fld> BYE = [
        Fld.req(\'v\', Check.integer(null, null)),
    ]
    static final Map<String, List<Fld>> SENDER = [
        \'hello\': HELLO,
        \'frame\': FRAME,
        \'rois\': ROIS,
        \'control\': CONTROL,
        \'bye\': BYE,
    ] as LinkedHashMap
}
// <<< END GENERATED

/** A label value ImageJ cannot hold exactly. */
@CompileStatic
class LabelRange extends Exception {
    LabelRange(String message) { super(message) }
}

/** A message broke the protocol; `code` is one of the error codes above. */
@CompileStatic
class ProtocolError extends Exception {
    final String code
    final Object seq

    ProtocolError(String code, String message, Object seq) {
        super(message)
        this.code = code
        this.seq = seq
    }
}

/** A field failed its check; becomes `bad_message` with the message\'s seq. */
@CompileStatic
class Invalid extends Exception {
    Invalid(String message) { super(message) }
}

/** Where a value sits in a message ($.display.kind), spelled out only for an error. */
@CompileStatic
class At {
    final At parent
    final Object key

    At(At parent, Object key) {
        this.parent = parent
        this.key = key
    }

    String toString() {
        if (parent == null) return key.toString()
        return parent.toString() + (key instanceof Integer ? "[${key}]" : ".${key}")
    }
}

/**
 * A field check, the Groovy spelling of protocol.py\'s msgspec annotations: returns the value
 * (numbers normalised) or throws Invalid. JSON integers arrive as Long or BigInteger, other
 * numbers as Double; like msgspec, an int field refuses 1.0 and true.
 */
@CompileStatic
abstract class Check {
    abstract Object check(Object v, At at)

    static boolean isInt(Object v) { v instanceof Long || v instanceof BigInteger }

    static BigInteger big(Object v) { v instanceof BigInteger ? (BigInteger) v : BigInteger.valueOf((Long) v) }

    static Invalid invalid(String what, Object v, At at) {
        new Invalid("expected ${what} at ${at}, got ${v instanceof String || v instanceof Map || v instanceof List ? Json.kind(v) + \' \' + Json.encode(v).take(80) : Json.encode(v)}".toString())
    }

    /** An integer in lo..hi (null: unbounded). */
    static Check integer(Long lo, Long hi) {
        return new Check() {
            Object check(Object v, At at) {
                if (v instanceof Long) {
                    long x = (Long) v
                    if ((lo == null || x >= lo) && (hi == null || x <= hi)) return v
                } else if (v instanceof BigInteger) {
                    BigInteger b = (BigInteger) v
                    if ((lo == null || b >= BigInteger.valueOf(lo)) && (hi == null || b <= BigInteger.valueOf(hi))) return v
                }
                throw invalid("an integer in [${lo != null ? lo : \'-inf\'}, ${hi != null ? hi : \'inf\'}]".toString(), v, at)
            }
        }
    }

    /** A finite number in lo..hi (ints accepted, as by msgspec\'s float). */
    static Check number(Double lo, Double hi) {
        return new Check() {
            Object check(Object v, At at) {
                if (isInt(v) || v instanceof Double) {
                    double d = ((Number) v).doubleValue()
                    if (!Double.isInfinite(d) && (lo == null || d >= lo) && (hi == null || d <= hi)) return d
                }
                throw invalid("a number in [${lo != null ? lo : \'-inf\'}, ${hi != null ? hi : \'inf\'}]".toString(), v, at)
            }
        }
    }

    /** A string of min..max characters, matching `pattern` as a whole (unlike Python\'s `$`,
     * no trailing newline slips through). */
    static Check string(int min, int max, Pattern pattern = null) {
        return new Check() {
            Object check(Object v, At at) {
                if (v instanceof String) {
                    String s = (String) v
                    int n = s.codePointCount(0, s.length())
                    if (n >= min && n <= max && (pattern == null || pattern.matcher(s).matches())) return s
                }
                throw invalid("a string of ${min}..${max} characters${pattern != null ? \' matching \' + pattern : \'\'}".toString(), v, at)
            }
        }
    }

    static Check oneOf(Collection<String> values) {
        return new Check() {
            Object check(Object v, At at) {
                if (v instanceof String && values.contains(v)) return v
                throw invalid("one of ${values}".toString(), v, at)
            }
        }
    }

    static Check listOf(Check item, int min, int max) {
        return new Check() {
            Object check(Object v, At at) {
                if (!(v instanceof List) || ((List) v).size() < min || ((List) v).size() > max) {
                    throw invalid("an array of ${min}..${max} items".toString(), v, at)
                }
                List l = (List) v
                List out = new ArrayList(l.size())
                for (int i = 0; i < l.size(); i++) out.add(item.check(l.get(i), new At(at, i)))
                return out
            }
        }
    }

    static Check dictOf(Check key, Check value, int max) {
        return new Check() {
            Object check(Object v, At at) {
                if (!(v instanceof Map) || ((Map) v).size() > max) throw invalid("an object of at most ${max} keys".toString(), v, at)
                Map out = new LinkedHashMap()
                for (Map.Entry e : ((Map) v).entrySet()) {
                    At where = new At(at, e.key)
                    key.check(e.key, where)
                    out.put(e.key, value.check(e.value, where))
                }
                return out
            }
        }
    }

    static Check struct(List<Fld> fields) {
        return new Check() {
            Object check(Object v, At at) {
                if (!(v instanceof Map)) throw invalid(\'an object\', v, at)
                return Fld.decode((Map) v, fields, at)
            }
        }
    }

    static Check bool() {
        return new Check() {
            Object check(Object v, At at) {
                if (v instanceof Boolean) return v
                throw invalid(\'true or false\', v, at)
            }
        }
    }

    static Check any() {
        return new Check() {
            Object check(Object v, At at) { v }
        }
    }

    static Check nullable(Check inner) {
        return new Check() {
            Object check(Object v, At at) { v == null ? null : inner.check(v, at) }
        }
    }
}

/** One field of a message: its name, its check, and its default (REQUIRED if it has none). */
@CompileStatic
class Fld {
    static final Object REQUIRED = new Object()
    final String name
    final Check check
    final Object dflt

    Fld(String name, Check check, Object dflt) {
        this.name = name
        this.check = check
        this.dflt = dflt
    }

    static Fld req(String name, Check check) { new Fld(name, check, REQUIRED) }

    static Fld opt(String name, Check check, Object dflt) { new Fld(name, check, dflt) }

    /** Check `json` against `fields`; unknown keys are ignored (a v1.x sender may add some). */
    static Map decode(Map json, List<Fld> fields, At at) {
        Map out = new LinkedHashMap()
        for (Fld f : fields) {
            if (json.containsKey(f.name)) {
                out.put(f.name, f.check.check(json.get(f.name), new At(at, f.name)))
            } else if (f.dflt.is(REQUIRED)) {
                throw new Invalid("missing required field ${f.name} at ${at}".toString())
            } else {
                out.put(f.name, f.dflt)
            }
        }
        return out
    }
}

/** Decoding and cross-field checks of sender -> receiver messages (tables: the generated Fields). */
@CompileStatic
class Messages {
    /** Validation steps 1-4: size, JSON, version, fields. Returns the checked message. */
    static Map decode(byte[] header) {
        if (header.length > P.MAX_HEADER_BYTES) {
            throw new ProtocolError(P.TOO_LARGE, "header of ${header.length} bytes exceeds ${P.MAX_HEADER_BYTES}".toString(), null)
        }
        Object json
        try {
            json = Json.parseUtf8(header)
        } catch (JsonError e) {
            throw new ProtocolError(P.BAD_JSON, "unreadable header: ${e.message}".toString(), null)
        }
        // The envelope: just enough to check the version before trusting the rest.
        if (!(json instanceof Map)) throw new ProtocolError(P.BAD_MESSAGE, "unreadable header: expected an object, got ${Json.kind(json)}".toString(), null)
        Map m = (Map) json
        Object v = m.get(\'v\'), type = m.get(\'type\'), seq = m.get(\'seq\')
        if (!Check.isInt(v)) throw new ProtocolError(P.BAD_MESSAGE, "unreadable header: v must be an integer, got ${Json.kind(v)}".toString(), null)
        if (!(type instanceof String)) throw new ProtocolError(P.BAD_MESSAGE, "unreadable header: type must be a string, got ${Json.kind(type)}".toString(), null)
        if (type == \'hello\' || type == \'bye\') seq = null  // they have no seq: one there is ignored
        if (seq != null && !Check.isInt(seq)) throw new ProtocolError(P.BAD_MESSAGE, "unreadable header: seq must be an integer or null, got ${Json.kind(seq)}".toString(), null)
        if (v != (Object) Long.valueOf(P.VERSION)) {
            throw new ProtocolError(P.UNSUPPORTED_VERSION, "protocol version ${v} is not supported (supported: [${P.VERSION}]); upgrade the older of sender and receiver".toString(), seq)
        }
        List<Fld> fields = Fields.SENDER.get(type)
        if (fields == null) throw new ProtocolError(P.BAD_MESSAGE, "unknown message type ${Json.quote((String) type)} (expected one of ${Fields.SENDER.keySet()})".toString(), seq)
        try {
            Map out = Fld.decode(m, fields, new At(null, \'$\'))
            out.put(\'type\', type)
            return out
        } catch (Invalid e) {
            throw new ProtocolError(P.BAD_MESSAGE, "invalid ${Json.quote((String) type)} message: ${e.message}".toString(), seq)
        }
    }

    /** Step 6 for frames: shape x itemsize == nbytes, size cap, axis names. */
    static void checkFrame(Map f) {
        BigInteger expected = BigInteger.valueOf(P.DTYPES.get(f.get(\'dtype\')))
        for (Object d : (List) f.get(\'shape\')) expected = expected.multiply(Check.big(d))
        BigInteger nbytes = Check.big(f.get(\'nbytes\'))
        if (expected != nbytes) {
            throw new ProtocolError(P.BAD_SHAPE, "shape ${f.get(\'shape\')} x ${f.get(\'dtype\')} is ${expected} bytes but nbytes=${nbytes}".toString(), f.get(\'seq\'))
        }
        if (nbytes > BigInteger.valueOf(Local.MAX_FRAME_BYTES)) {
            throw new ProtocolError(P.TOO_LARGE, "frame of ${nbytes} bytes exceeds this receiver\'s max_frame_bytes=${Local.MAX_FRAME_BYTES}".toString(), f.get(\'seq\'))
        }
        checkAxes(f)
        checkRgb(f)
        List limits = (List) ((Map) f.get(\'display\')).get(\'contrast_limits\')
        if (limits != null && !(((Number) limits.get(0)).doubleValue() < ((Number) limits.get(1)).doubleValue())) {
            throw new ProtocolError(P.BAD_MESSAGE, "display.contrast_limits ${limits} must be [low, high] with low below high".toString(), f.get(\'seq\'))
        }
    }

    /** RGB(A) (docs/protocol.md): display.rgb, else auto-detected for a uint8 frame whose last
     * dimension is 3 or 4 (ndim >= 3), never for labels. */
    static boolean isRgb(Map f) {
        Map display = (Map) f.get(\'display\')
        Object rgb = display.get(\'rgb\')
        List shape = (List) f.get(\'shape\')
        boolean fits = f.get(\'dtype\') == \'uint8\' && shape.size() >= 3 && ((Long) shape.get(shape.size() - 1)) in [3L, 4L]
        if (rgb == null) return fits && display.get(\'kind\') != \'labels\'
        return (Boolean) rgb
    }

    static void checkRgb(Map f) {
        Map display = (Map) f.get(\'display\')
        if (display.get(\'rgb\') != Boolean.TRUE) return
        List shape = (List) f.get(\'shape\')
        boolean fits = f.get(\'dtype\') == \'uint8\' && shape.size() >= 3 && ((Long) shape.get(shape.size() - 1)) in [3L, 4L]
        if (!fits || display.get(\'kind\') == \'labels\') {
            throw new ProtocolError(P.BAD_MESSAGE, "rgb=true needs an image (not labels) of dtype uint8 whose last dimension is 3 (RGB) or 4 (RGBA), at least 3-D; got ${f.get(\'dtype\')} ${shape}${display.get(\'kind\') == \'labels\' ? \' labels\' : \'\'}".toString(), f.get(\'seq\'))
        }
    }

    /** Step 6 for ROIs: point counts per kind, axis names. */
    static void checkRois(Map m) {
        for (Object o : (List) m.get(\'rois\')) {
            Map roi = (Map) o
            int[] range = P.ROI_POINT_COUNTS.get(roi.get(\'kind\')) ?: ([3, P.MAX_ROIS] as int[])  // polygon
            int n = ((List) roi.get(\'coords\')).size()
            if (n < range[0] || n > range[1]) {
                throw new ProtocolError(P.BAD_MESSAGE, "a ${roi.get(\'kind\')} ROI needs ${range[0]}..${range[1]} points, got ${n}".toString(), m.get(\'seq\'))
            }
        }
        checkAxes(m)
    }

    static void checkAxes(Map m) {
        List<String> names = (List<String>) m.get(\'axis_names\')
        Map axes = (Map) m.get(\'axes\')
        if (names == null && axes.isEmpty()) return  // the common case of a live stream
        if (names != null && (new HashSet(names).size() != names.size() || !names.containsAll(axes.keySet()))) {
            throw new ProtocolError(P.BAD_MESSAGE, "axis_names ${names} must be unique and name every key of axes ${axes.keySet()}".toString(), m.get(\'seq\'))
        }
        // c, z, t by any synonym, once; the keys of axes are among axis_names when given
        Collection<String> given = names != null ? names : (Collection<String>) axes.keySet()
        Set<String> seen = new HashSet<String>()
        for (String name : given) {
            if (!seen.add(Layout.axisName(name))) {
                throw new ProtocolError(P.BAD_MESSAGE, "axis names ${given} name one axis twice: viewers read ${P.AXIS_SYNONYMS.keySet().findAll { String k -> k.length() > 1 }.join(\', \')} (in any case) as c, z or t; give each axis one name".toString(), m.get(\'seq\'))
            }
        }
    }
}

// ==========================================================================================
// 2. Headers are UTF-8 JSON objects (protocol.md: Transport): a strict, depth-limited parser
//    (what msgspec refuses, this refuses) and an encoder
// ==========================================================================================

@CompileStatic
class JsonError extends Exception {
    JsonError(String message) { super(message) }
}

/** Strict on purpose: what msgspec refuses (NaN, trailing data, bad UTF-8...) this refuses too. */
@CompileStatic
class Json {
    // Characters as constants: on Groovy 2.4 each `\'x\' as char` in an expression is a runtime
    // conversion (a third of the receiver\'s per-header time went there).
    private static final char BACKSLASH = \'\\\\\' as char
    private static final char CLOSE_BRACE = \'}\' as char
    private static final char CLOSE_BRACKET = \']\' as char
    private static final char COLON = \':\' as char
    private static final char COMMA = \',\' as char
    private static final char FIRST_PRINTABLE = (char) 0x20
    private static final char LOWER_E = \'e\' as char
    private static final char MINUS = \'-\' as char
    private static final char NEWLINE = \'\\n\' as char
    private static final char NINE = \'9\' as char
    private static final char OPEN_BRACE = \'{\' as char
    private static final char OPEN_BRACKET = \'[\' as char
    private static final char PLUS = \'+\' as char
    private static final char POINT = \'.\' as char
    private static final char QUOTE = \'"\' as char
    private static final char RETURN = \'\\r\' as char
    private static final char SPACE = \' \' as char
    private static final char TAB = \'\\t\' as char
    private static final char UPPER_E = \'E\' as char
    private static final char ZERO = \'0\' as char
    // As deep as the Python receiver goes: msgspec stops at Python\'s recursion limit (1000)
    // less the frames already on the receiver thread\'s stack, which is 994 nested containers
    // (the header object included) for polystore.streaming.Receiver on CPython 3.11 with
    // msgspec 0.22 (tests/test_fiji.py: test_nesting_depth_matches_python_receiver).
    static final int MAX_DEPTH = 994
    private final String s
    private int i = 0
    private int depth = 0

    private Json(String s) { this.s = s }

    static Object parseUtf8(byte[] data) throws JsonError {
        String text
        try {
            text = StandardCharsets.UTF_8.newDecoder().onMalformedInput(CodingErrorAction.REPORT)
                .onUnmappableCharacter(CodingErrorAction.REPORT).decode(ByteBuffer.wrap(data)).toString()
        } catch (CharacterCodingException ignored) {
            throw new JsonError(\'not valid UTF-8\')
        }
        Json p = new Json(text)
        p.ws()
        Object value = p.value()
        p.ws()
        if (p.i != text.length()) throw p.fail(\'trailing characters\')
        return value
    }

    private JsonError fail(String what) { new JsonError("JSON is malformed: ${what} (character ${i})".toString()) }

    private void ws() {
        while (i < s.length()) {
            char c = s.charAt(i)
            if (c == SPACE || c == NEWLINE || c == RETURN || c == TAB) i++
            else break
        }
    }

    private Object value() {
        if (i >= s.length()) throw fail(\'truncated input\')
        char c = s.charAt(i)
        if (c == OPEN_BRACE) return object()
        if (c == OPEN_BRACKET) return array()
        if (c == QUOTE) return string()
        if (c == MINUS || (c >= ZERO && c <= NINE)) return number()
        if (s.startsWith(\'true\', i)) { i += 4; return Boolean.TRUE }
        if (s.startsWith(\'false\', i)) { i += 5; return Boolean.FALSE }
        if (s.startsWith(\'null\', i)) { i += 4; return null }
        throw fail(\'invalid character\')
    }

    private Map object() {
        if (++depth > MAX_DEPTH) throw fail(\'nested too deeply\')
        i++
        Map m = new LinkedHashMap()
        ws()
        if (i < s.length() && s.charAt(i) == CLOSE_BRACE) { i++; depth--; return m }
        while (true) {
            ws()
            if (i >= s.length() || s.charAt(i) != QUOTE) throw fail(\'expected a string key\')
            String key = string()
            ws()
            if (i >= s.length() || s.charAt(i) != COLON) throw fail("expected \':\'")
            i++
            ws()
            m.put(key, value())  // a repeated key keeps its last value, as in msgspec
            ws()
            if (i >= s.length()) throw fail(\'truncated input\')
            char c = s.charAt(i++)
            if (c == CLOSE_BRACE) break
            if (c != COMMA) throw fail("expected \',\' or \'}\'")
        }
        depth--
        return m
    }

    private List array() {
        if (++depth > MAX_DEPTH) throw fail(\'nested too deeply\')
        i++
        List l = new ArrayList()
        ws()
        if (i < s.length() && s.charAt(i) == CLOSE_BRACKET) { i++; depth--; return l }
        while (true) {
            ws()
            l.add(value())
            ws()
            if (i >= s.length()) throw fail(\'truncated input\')
            char c = s.charAt(i++)
            if (c == CLOSE_BRACKET) break
            if (c != COMMA) throw fail("expected \',\' or \']\'")
        }
        depth--
        return l
    }

    private String string() {
        i++  // opening quote
        StringBuilder sb = null
        int start = i
        while (true) {
            if (i >= s.length()) throw fail(\'unterminated string\')
            char c = s.charAt(i)
            if (c == QUOTE) {
                String out = sb == null ? s.substring(start, i) : sb.append(s, start, i).toString()
                i++
                return out
            }
            if (c < FIRST_PRINTABLE) throw fail(\'control character in string\')
            if (c == BACKSLASH) {
                if (sb == null) sb = new StringBuilder()
                sb.append(s, start, i)
                if (++i >= s.length()) throw fail(\'unterminated string\')
                char e = s.charAt(i++)
                switch (e) {
                    case \'"\' as char: sb.append(\'"\'); break
                    case \'\\\\\' as char: sb.append(\'\\\\\'); break
                    case \'/\' as char: sb.append(\'/\'); break
                    case \'b\' as char: sb.append(\'\\b\'); break
                    case \'f\' as char: sb.append(\'\\f\'); break
                    case \'n\' as char: sb.append(\'\\n\'); break
                    case \'r\' as char: sb.append(\'\\r\'); break
                    case \'t\' as char: sb.append(\'\\t\'); break
                    case \'u\' as char:
                        char u = hex4()
                        if (Character.isLowSurrogate(u)) throw fail(\'lone surrogate in \\\\u escape\')
                        if (Character.isHighSurrogate(u)) {  // must pair, as msgspec requires
''')
    s.append('''                            if (!s.startsWith(\'\\\\u\', i)) throw fail(\'lone surrogate in \\\\u escape\')
                            i += 2
                            char low = hex4()
                            if (!Character.isLowSurrogate(low)) throw fail(\'lone surrogate in \\\\u escape\')
                            sb.append(u).append(low)
                        } else {
                            sb.append(u)
                        }
                        break
                    default: throw fail(\'bad escape\')
                }
                start = i
            } else {
                i++
            }
        }
    }

    private char hex4() {
        if (i + 4 > s.length()) throw fail(\'bad \\\\u escape\')
        String digits = s.substring(i, i + 4)
        if (!(digits ==~ /[0-9A-Fa-f]{4}/)) throw fail(\'bad \\\\u escape\')
        i += 4
        return (char) Integer.parseInt(digits, 16)
    }

    private Object number() {
        int start = i
        if (s.charAt(i) == MINUS) i++
        if (i >= s.length()) throw fail(\'truncated number\')
        if (s.charAt(i) == ZERO) i++
        else if (digit()) { while (digit()) i++ }
        else throw fail(\'invalid number\')
        boolean integral = true
        if (i < s.length() && s.charAt(i) == POINT) {
            integral = false
            i++
            if (!digit()) throw fail(\'invalid number\')
            while (digit()) i++
        }
        if (i < s.length() && (s.charAt(i) == LOWER_E || s.charAt(i) == UPPER_E)) {
            integral = false
            i++
            if (i < s.length() && (s.charAt(i) == PLUS || s.charAt(i) == MINUS)) i++
            if (!digit()) throw fail(\'invalid number\')
            while (digit()) i++
        }
        String text = s.substring(start, i)
        if (!integral) return Double.valueOf(text)
        return text.length() < 19 ? (Object) Long.valueOf(text) : normalise(new BigInteger(text))
    }

    private boolean digit() { i < s.length() && s.charAt(i) >= ZERO && s.charAt(i) <= NINE }

    private static Object normalise(BigInteger b) { b.bitLength() < 64 ? (Object) Long.valueOf(b.longValue()) : b }

    static String kind(Object v) {
        if (v == null) return \'null\'
        if (v instanceof Map) return \'object\'
        if (v instanceof List) return \'array\'
        if (v instanceof String) return \'string\'
        if (v instanceof Boolean) return \'bool\'
        if (v instanceof Double) return \'float\'
        return \'int\'
    }

    static String encode(Object v) {
        StringBuilder sb = new StringBuilder()
        write(sb, v)
        return sb.toString()
    }

    static byte[] encodeUtf8(Object v) { encode(v).getBytes(StandardCharsets.UTF_8) }

    static String quote(String s) {
        StringBuilder sb = new StringBuilder()
        writeString(sb, s)
        return sb.toString()
    }

    private static void write(StringBuilder sb, Object v) {
        if (v == null) sb.append(\'null\')
        else if (v instanceof String || v instanceof GString) writeString(sb, v.toString())
        else if (v instanceof Boolean) sb.append(v.toString())
        else if (v instanceof Double || v instanceof Float) {
            double d = ((Number) v).doubleValue()
            sb.append(Double.isNaN(d) || Double.isInfinite(d) ? \'null\' : Double.toString(d))
        } else if (v instanceof Number) sb.append(v.toString())
        else if (v instanceof Map) {
            sb.append(\'{\')
            boolean first = true
            for (Map.Entry e : ((Map) v).entrySet()) {
                if (!first) sb.append(\',\')
                first = false
                writeString(sb, String.valueOf(e.key))
                sb.append(\':\')
                write(sb, e.value)
            }
            sb.append(\'}\')
        } else if (v instanceof Collection || v instanceof Object[]) {
            sb.append(\'[\')
            boolean first = true
            for (Object o : (v instanceof Collection ? (Collection) v : Arrays.asList((Object[]) v))) {
                if (!first) sb.append(\',\')
                first = false
                write(sb, o)
            }
            sb.append(\']\')
        } else writeString(sb, v.toString())
    }

    private static void writeString(StringBuilder sb, String s) {
        sb.append(\'"\')
        for (int k = 0; k < s.length(); k++) {
            char c = s.charAt(k)
            if (c == QUOTE) sb.append(\'\\\\"\')
            else if (c == BACKSLASH) sb.append(\'\\\\\\\\\')
            else if (c < FIRST_PRINTABLE) sb.append(String.format(\'\\\\u%04x\', (int) c))
            else sb.append(c)
        }
        sb.append(\'"\')
    }
}

// ==========================================================================================
// 3. Segments (protocol.md: Credits and segments, Validation step 7): read-only, cached
//    mappings of the senders\' shared memory; the mirror of SegmentReader in shm.py
// ==========================================================================================

/** A segment could not be read: `missing` tells a vanished one from a forbidden one. */
@CompileStatic
class SegmentError extends Exception {
    final boolean missing

    SegmentError(String message, boolean missing) {
        super(message)
        this.missing = missing
    }
}

/** `nbytes` of a segment: `buffer` (little-endian) holds them from `position`. */
@CompileStatic
class View {
    ByteBuffer buffer
    int position
    MappedByteBuffer temporary  // a window mapped for this frame only; unmapped after the copy
}

/**
 * Segments are opened read-only (READ_ONLY map of a channel opened with READ and
 * NOFOLLOW_LINKS), checked to be regular files of this user, and kept mapped in a small LRU,
 * since senders reuse their segments. Each keeps its read-only channel, so the segment\'s
 * current size is checked before every copy (an fstat, as shm.py does): a segment truncated
 * after it was mapped is an error reply, not a fault in the copy. Nothing here can write a
 * sender\'s memory or unlink its segment.
 */
@CompileStatic
class SegmentReader {
    static final Path SHM_DIR = Paths.get(\'/dev/shm\')
    final int maxCached
    final LinkedHashMap<String, Mapping> maps = new LinkedHashMap<String, Mapping>(16, 0.75f, true)
    final Object uid = ownUid()

    static class Mapping {
        FileChannel channel  // read-only, for the current size
        MappedByteBuffer buffer  // whole segment, or null when it is too large for one map
        long size  // when mapped
        Object inode

        void close() {
            SegmentReader.unmap(buffer)
            try { channel.close() } catch (IOException ignored) { }
        }
    }

    SegmentReader(int maxCached) { this.maxCached = maxCached }

    static Object ownUid() {
        try {
            return Files.getAttribute(Paths.get(\'/proc/self\'), \'unix:uid\')
        } catch (Exception ignored) {
            return null  // not Linux: shared memory is never used (the probe fails), frames come inline
        }
    }

    View view(String name, long offset, long nbytes) throws SegmentError {
        Mapping m = maps.get(name)
        if (m == null) {
            m = open(name)
            maps.put(name, m)
            while (maps.size() > maxCached) {
                String eldest = maps.keySet().iterator().next()
                maps.remove(eldest).close()
            }
        }
        long size
        try {
            size = m.channel.size()  // now, not when it was mapped
        } catch (IOException e) {
            maps.remove(name)?.close()  // a broken channel is not kept: the next frame opens again
            throw new SegmentError("segment ${name} cannot be read: ${e}".toString(), false)
        }
        if (m.buffer != null && size > m.size) {  // it grew: map it again
            maps.remove(name).close()
            m = open(name)
            maps.put(name, m)
            size = Math.min(size, m.size)  // (another file may have taken the name)
        }
        if (nbytes > size || offset > size - nbytes) {  // (offset + nbytes could wrap)
            throw new SegmentError("segment ${name} holds ${size} bytes; offset ${offset} + nbytes ${nbytes} would read past its end".toString(), false)
        }
        View v = new View()
        if (m.buffer != null) {
            v.buffer = m.buffer
            v.position = (int) offset
        } else {  // a segment over 2 GiB: map just this frame\'s bytes
            try {
                v.temporary = m.channel.map(FileChannel.MapMode.READ_ONLY, offset, nbytes)
            } catch (IOException e) {
                throw new SegmentError("segment ${name} cannot be mapped: ${e}".toString(), false)
            }
            v.buffer = v.temporary
            v.position = 0
        }
        return v
    }

    private Mapping open(String name) throws SegmentError {
        Path path = SHM_DIR.resolve(name)
        Map<String, Object> attrs
        try {
            attrs = Files.readAttributes(path, \'unix:uid,size,isRegularFile,ino,dev\', LinkOption.NOFOLLOW_LINKS)
        } catch (NoSuchFileException ignored) {
            throw new SegmentError("segment ${name} does not exist (unlinked by its sender?)".toString(), true)
        } catch (Exception e) {
            throw new SegmentError("segment ${name} cannot be opened: ${e}".toString(), false)
        }
        if (!attrs.get(\'isRegularFile\') || uid == null || attrs.get(\'uid\') != uid) {
            throw new SegmentError("segment ${name} is not a shared-memory segment of this user".toString(), false)
        }
        FileChannel ch = channel(name)
        boolean kept = false
        try {
            Mapping m = new Mapping()
            m.channel = ch
            m.size = ch.size()
            m.inode = "${attrs.get(\'dev\')}:${attrs.get(\'ino\')}".toString()
            if (m.size == 0) throw new SegmentError("segment ${name} is empty".toString(), false)
            if (m.size <= Integer.MAX_VALUE) m.buffer = ch.map(FileChannel.MapMode.READ_ONLY, 0, m.size)
            kept = true
            return m
        } catch (IOException e) {
            throw new SegmentError("segment ${name} cannot be mapped: ${e}".toString(), false)
        } finally {
            if (!kept) {
                try { ch.close() } catch (IOException ignored) { }
            }
        }
    }

    private static FileChannel channel(String name) throws SegmentError {
        try {
            return FileChannel.open(SHM_DIR.resolve(name), StandardOpenOption.READ, LinkOption.NOFOLLOW_LINKS)
        } catch (NoSuchFileException ignored) {
            throw new SegmentError("segment ${name} does not exist (unlinked by its sender?)".toString(), true)
        } catch (Exception e) {
            throw new SegmentError("segment ${name} cannot be opened: ${e}".toString(), false)
        }
    }

    /** Drop mappings whose segment its sender has unlinked (or replaced). */
    int forgetUnlinked() {
        List<String> gone = []
        for (Map.Entry<String, Mapping> e : maps.entrySet()) {
            try {
                Map<String, Object> a = Files.readAttributes(SHM_DIR.resolve(e.key), \'unix:ino,dev\', LinkOption.NOFOLLOW_LINKS)
                if ("${a.get(\'dev\')}:${a.get(\'ino\')}".toString() != e.value.inode) gone.add(e.key)
            } catch (Exception ignored) {
                gone.add(e.key)
            }
        }
        for (String name : gone) maps.remove(name).close()
        return gone.size()
    }

    void forgetPrefix(String prefix) {
        for (String name : new ArrayList<String>(maps.keySet())) {
            if (name.startsWith(prefix)) maps.remove(name).close()
        }
    }

    void close() {
        for (Mapping m : maps.values()) m.close()
        maps.clear()
    }

    private static Method invokeCleaner
    private static Object unsafe

    /** Unmap now instead of whenever the GC gets to it: unlinked segments give their memory
     * back promptly. Only ever called on buffers nothing else references. */
    static void unmap(MappedByteBuffer buffer) {
        if (buffer == null) return
        try {
            if (invokeCleaner == null) {
                Class<?> cls = Class.forName(\'sun.misc.Unsafe\')
                java.lang.reflect.Field f = cls.getDeclaredField(\'theUnsafe\')
                f.setAccessible(true)
                unsafe = f.get(null)
                invokeCleaner = cls.getMethod(\'invokeCleaner\', ByteBuffer)
            }
            invokeCleaner.invoke(unsafe, buffer)
        } catch (Throwable ignored) {
            // Java 8 or a locked-down JVM: the mapping goes with the next GC.
        }
    }
}

// ==========================================================================================
// 4. Pixels: wire dtypes -> ImageJ pixel arrays (the type mapping in the header)
// ==========================================================================================

@CompileStatic
class Pixels {
    static int bitsFor(String dtype) { dtype == \'uint8\' ? 8 : dtype == \'uint16\' ? 16 : 32 }

    static Object newPlane(int bits, int n) {
        bits == 8 ? new byte[n] : bits == 16 ? (Object) new short[n] : bits == 24 ? (Object) new int[n] : new float[n]
    }

    /** Bytes one pixel of an ImageJ image of `bits` takes in memory. */
    static int bytesPerPixel(int bits) { bits == 24 ? 4 : bits >> 3 }

    /** `n` RGB(A) pixels of `samples` bytes each into an ImageJ RGB plane (alpha dropped:
     * ImageJ\'s RGB images have none). */
    static void copyRgb(ByteBuffer src, long position, int n, int samples, int[] dest) {
        ByteBuffer b = at(src, position)
        for (int k = 0; k < n; k++) {
            int r = b.get() & 0xff, g = b.get() & 0xff, bl = b.get() & 0xff
            if (samples == 4) b.get()
            dest[k] = (int) (0xff000000 | (r << 16) | (g << 8) | bl)
        }
    }

    /** Largest integer a 32-bit float holds exactly, with every integer below it. */
    static final long FLOAT_EXACT = 1L << 24

    /** The top of a display range starting at `lo` that is empty: a little above it, by 1 or,
     * for values where lo + 1 == lo (2^53 on; ImageJ keeps float32 ranges), relatively. */
    static double above(double lo) { return lo + Math.max(1d, Math.abs(lo) * 1e-6d) }

    static ByteBuffer at(ByteBuffer src, long position) {
        ByteBuffer b = src.duplicate().order(ByteOrder.LITTLE_ENDIAN)
        ((Buffer) b).position((int) position)
        return b
    }

    /** Labels: 16-bit when every value is an integer in 0..65535, else 32-bit; a label a 32-bit
     * float cannot hold exactly (|v| > 2^24) would merge with its neighbours: LabelRange. */
    static int labelBits(ByteBuffer src, long position, String dtype, long count) throws LabelRange {
        if (dtype == \'uint8\' || dtype == \'uint16\') return 16
        ByteBuffer b = at(src, position)
        if (dtype.startsWith(\'float\')) {  // whole numbers a 32-bit float holds exactly, as napari
            for (long k = 0; k < count; k++) {
                double v = dtype == \'float64\' ? b.getDouble() : dtype == \'float32\' ? (double) b.getFloat() : (double) halfToFloat(b.getShort())
                if (Double.isNaN(v) || Double.isInfinite(v) || v != Math.floor(v))
                    throw new LabelRange("labels must be whole numbers, but this ${dtype} frame has ${Double.isNaN(v) || Double.isInfinite(v) ? \'NaN or infinity\' : \'a fraction (\' + v + \')\'}; send an integer array (e.g. mask.astype(np.int32))".toString())
                if (v > FLOAT_EXACT || v < -FLOAT_EXACT)
                    throw new LabelRange("label ${(long) v} cannot be held exactly by ImageJ (32-bit float images hold integer labels up to 2^24 = 16777216); it would merge with its neighbours. Renumber the labels (e.g. skimage.segmentation.relabel_sequential) before sending".toString())
            }
            return 32
        }
        int bits = 16
        for (long k = 0; k < count; k++) {
            long v
            switch (dtype) {
                case \'int8\': v = b.get(); break
                case \'int16\': v = b.getShort(); break
                case \'uint32\': v = b.getInt() & 0xffffffffL; break
                case \'int32\': v = b.getInt(); break
                default:  // int64, uint64 (a negative long is a huge uint64)
                    v = b.getLong()
            }
            if (v < 0 || v > 65535) bits = 32
            if (v > FLOAT_EXACT || v < -FLOAT_EXACT || (dtype == \'uint64\' && v < 0)) {
                String shown = dtype == \'uint64\' ? Long.toUnsignedString(v) : Long.toString(v)
                throw new LabelRange("label ${shown} cannot be held exactly by ImageJ (32-bit float images hold integer labels up to 2^24 = 16777216); it would merge with its neighbours. Renumber the labels (e.g. skimage.segmentation.relabel_sequential) before sending".toString())
            }
        }
        return bits
    }

    /** Copy `n` values of `dtype` at `position` into `dest` (byte[], short[] or float[]). */
    static void copy(ByteBuffer src, long position, String dtype, int n, Object dest) {
        ByteBuffer b = at(src, position)
        if (dest instanceof byte[]) {  // uint8 only
            b.get((byte[]) dest, 0, n)
        } else if (dest instanceof short[]) {
            short[] d = (short[]) dest
            switch (dtype) {
                case \'uint16\': case \'int16\': b.asShortBuffer().get(d, 0, n); break  // int16 only for in-range labels
                case \'uint8\': case \'int8\': for (int k = 0; k < n; k++) d[k] = (short) (b.get() & 0xff); break
                case \'uint32\': case \'int32\': for (int k = 0; k < n; k++) d[k] = (short) b.getInt(); break
                default: for (int k = 0; k < n; k++) d[k] = (short) b.getLong()  // (u)int64 labels
            }
        } else {
            float[] d = (float[]) dest
            switch (dtype) {
                case \'float32\': b.asFloatBuffer().get(d, 0, n); break
                case \'uint8\': for (int k = 0; k < n; k++) d[k] = (float) (b.get() & 0xff); break
                case \'int8\': for (int k = 0; k < n; k++) d[k] = (float) b.get(); break
                case \'uint16\': for (int k = 0; k < n; k++) d[k] = (float) (b.getShort() & 0xffff); break
                case \'int16\': for (int k = 0; k < n; k++) d[k] = (float) b.getShort(); break
                case \'uint32\': for (int k = 0; k < n; k++) d[k] = (float) (b.getInt() & 0xffffffffL); break
                case \'int32\': for (int k = 0; k < n; k++) d[k] = (float) b.getInt(); break
                case \'uint64\': for (int k = 0; k < n; k++) d[k] = unsignedToFloat(b.getLong()); break
                case \'int64\': for (int k = 0; k < n; k++) d[k] = (float) b.getLong(); break
                case \'float16\': for (int k = 0; k < n; k++) d[k] = halfToFloat(b.getShort()); break
                case \'float64\': for (int k = 0; k < n; k++) d[k] = (float) b.getDouble(); break
                default: throw new IllegalArgumentException("dtype ${dtype}".toString())
            }
        }
    }

    /** uint64 -> nearest float32 (Java has no unsigned long; halve, convert, double, keeping
     * the low bit so rounding stays correct). */
    static float unsignedToFloat(long v) {
        if (v >= 0) return (float) v
        return ((float) ((v >>> 1) | (v & 1L))) * 2f
    }

    /** IEEE 754 binary16 -> binary32, exact (Java 8-17 has no Float.float16ToFloat). */
    static float halfToFloat(short h) {
        int bits = h & 0xffff
        int sign = (bits & 0x8000) << 16
        int exp = (bits >>> 10) & 0x1f
        int mant = bits & 0x3ff
        if (exp == 0x1f) return Float.intBitsToFloat(sign | 0x7f800000 | (mant << 13))  // inf, NaN
        if (exp != 0) return Float.intBitsToFloat(sign | ((exp + 112) << 23) | (mant << 13))
        if (mant == 0) return Float.intBitsToFloat(sign)  // +-0
        float v = (float) (mant * Math.pow(2, -24))  // subnormal: exact in float32
        return sign != 0 ? -v : v
    }

    /** A plane of any ImageJ type as 32-bit float (for promoting a stream). */
    static float[] toFloat(Object plane) {
        if (plane instanceof float[]) return (float[]) plane
        if (plane instanceof short[]) {
            short[] p = (short[]) plane
            float[] f = new float[p.length]
            for (int k = 0; k < p.length; k++) f[k] = (float) (p[k] & 0xffff)
            return f
        }
        byte[] p = (byte[]) plane
        float[] f = new float[p.length]
        for (int k = 0; k < p.length; k++) f[k] = (float) (p[k] & 0xff)
        return f
    }

    static double[] minMax(Object plane) {
        double lo = Double.POSITIVE_INFINITY, hi = Double.NEGATIVE_INFINITY
        if (plane instanceof byte[]) { for (byte v : (byte[]) plane) { int x = v & 0xff; if (x < lo) lo = x; if (x > hi) hi = x } }
        else if (plane instanceof short[]) { for (short v : (short[]) plane) { int x = v & 0xffff; if (x < lo) lo = x; if (x > hi) hi = x } }
        else if (plane instanceof float[]) { for (float v : (float[]) plane) { if (Float.isFinite(v)) { if (v < lo) lo = v; if (v > hi) hi = v } } }
        if (lo > hi) { lo = 0; hi = 1 }  // nothing finite
        return [lo, hi] as double[]
    }

    static double maxOf(Object plane) {
        double m = 0
        if (plane instanceof short[]) { for (short v : (short[]) plane) m = Math.max(m, (double) (v & 0xffff)) }
        else if (plane instanceof float[]) { for (float v : (float[]) plane) if (v > m) m = v }
        else for (byte v : (byte[]) plane) m = Math.max(m, (double) (v & 0xff))
        return m
    }
}

// ==========================================================================================
// 5. LUTs: colormap hints and the labels LUT
// ==========================================================================================

@CompileStatic
class Luts {
    static final Map<String, LUT> cache = [:]
    static final Map<String, String> ALIASES = [gray: \'grays\', grey: \'grays\', greys: \'grays\', grays: \'grays\']

    /** The LUT for a colormap hint, or null if neither ImageJ nor Fiji\'s luts folder has it.
     *  A name with a path in it is none: ImageJ opens luts/NAME.lut, so "../x" would read a
     *  file outside that folder (a FIFO there hung the receiver for good). */
    static LUT get(String name) {
        String key = name.toLowerCase().trim()
        key = ALIASES.get(key) ?: key
        if (key.contains(\'/\') || key.contains(\'\\\\\') || key.contains(\'..\') || key.contains(\'\\u0000\')) return null
        if (cache.containsKey(key)) return cache.get(key)
        LUT lut = null
        if (key == \'glasbey\') lut = glasbey()
        else {
            for (String candidate : [key, \'mpl-\' + key]) {  // Fiji names matplotlib\'s maps mpl-*
                try {
                    IndexColorModel cm = LutLoader.getLut(candidate)
                    if (cm != null) { lut = new LUT(cm, 0, 255); break }
                } catch (Exception ignored) {
                    // no such LUT
                }
            }
        }
        cache.put(key, lut)
        return lut
    }

    /** Fiji\'s glasbey_on_dark.lut if present; else the same idea built here: 255 colours each as
     * far as possible from all earlier ones (greedy max-min over an RGB grid), 0 = black. */
    static LUT glasbey() {
        for (String name : [\'glasbey_on_dark\', \'glasbey\']) {
            try {
                IndexColorModel cm = LutLoader.getLut(name)
                if (cm != null) return new LUT(cm, 0, 255)
            } catch (Exception ignored) {
                // not in this ImageJ
            }
        }
        byte[] r = new byte[256], g = new byte[256], b = new byte[256]
        int levels = 16
        int n = levels * levels * levels
        int[] cr = new int[n], cg = new int[n], cb = new int[n]
        double[] best = new double[n]
        for (int k = 0; k < n; k++) {
            cr[k] = (int) ((k % levels) * 255 / (levels - 1))
            cg[k] = (int) (((int) (k / levels) % levels) * 255 / (levels - 1))
            cb[k] = (int) ((int) (k / (levels * levels)) * 255 / (levels - 1))
            // too dark to see on the black background: never picked
            best[k] = 0.299 * cr[k] + 0.587 * cg[k] + 0.114 * cb[k] < 60 ? -1 : Double.MAX_VALUE
        }
        int pr = 0, pg = 0, pb = 0  // colour 0: black
        for (int idx = 1; idx < 256; idx++) {
            int pick = -1
            for (int k = 0; k < n; k++) {
                if (best[k] < 0) continue
                double dr = cr[k] - pr, dg = cg[k] - pg, db = cb[k] - pb
                double d = 2 * dr * dr + 4 * dg * dg + 3 * db * db  // rough perceptual weights
                if (d < best[k]) best[k] = d
                if (pick < 0 || best[k] > best[pick]) pick = k
            }
            pr = cr[pick]; pg = cg[pick]; pb = cb[pick]
            r[idx] = (byte) pr; g[idx] = (byte) pg; b[idx] = (byte) pb
            best[pick] = -1
        }
        return new LUT(r, g, b)
    }
}

/**
 * Labels shown so that neighbours differ at any count, as napari does: label v > 0 gets colour
 * 1 + (v - 1) mod 255 of the glasbey LUT (0 stays black), instead of ImageJ\'s linear display
 * range, which makes labels 1-3 black and lets about max/255 neighbours share a colour. The
 * pixels stay the exact label values (measurements, saved TIFFs); only the drawing differs.
 */
@CompileStatic
class LabelColors {
    static IndexColorModel model

    static IndexColorModel model() {
        if (model == null) {
            LUT g = Luts.glasbey()
            byte[] r = new byte[256], gr = new byte[256], b = new byte[256]
            g.getReds(r); g.getGreens(gr); g.getBlues(b)
            r[0] = 0; gr[0] = 0; b[0] = 0
            model = new IndexColorModel(8, 256, r, gr, b)
        }
        return model
    }

    static int index(double v) {
        if (v == 0 || Double.isNaN(v)) return 0
        return (int) (1 + Math.floorMod(((long) v) - 1L, 255L))  // -5 and 5 differ, as in napari
    }

    /** The colour index of every pixel of a plane of labels. */
    static byte[] indices(Object pixels) {
        if (pixels instanceof short[]) {
            short[] p = (short[]) pixels
            byte[] idx = new byte[p.length]
            for (int k = 0; k < idx.length; k++) idx[k] = (byte) index(p[k] & 0xffff)
            return idx
        }
        if (pixels instanceof byte[]) {
            byte[] p = (byte[]) pixels
            byte[] idx = new byte[p.length]
            for (int k = 0; k < idx.length; k++) idx[k] = (byte) index(p[k] & 0xff)
            return idx
        }
        float[] p = (float[]) pixels
        byte[] idx = new byte[p.length]
        for (int k = 0; k < idx.length; k++) idx[k] = (byte) index(p[k])
        return idx
    }

    static java.awt.Image render(int w, int h, Object pixels) {
        return new ij.process.ByteProcessor(w, h, indices(pixels), model()).createImage()
    }

    static int[] colours16

    /** The colour (0xRRGGBB) of every id a 16-bit (or 8-bit) plane can hold, as render() draws
     * it: one table look-up per pixel instead of a modulo. */
    static int[] colours16() {
        if (colours16 == null) {
            int[] colours = colours256()
            int[] table = new int[65536]
            for (int v = 0; v < table.length; v++) table[v] = colours[index(v)]
            colours16 = table
        }
        return colours16
    }

    /** The 256 colours (0xRRGGBB) of model(), by colour index. */
    static int[] colours256() {
        int[] colours = new int[256]
        model().getRGBs(colours)
        for (int k = 0; k < colours.length; k++) colours[k] &= 0xffffff
        return colours
    }

    /** Colour component-wise sum of two 0xRRGGBB colours, each component clamped at 255. */
    static int add(int a, int b) {
        int r = Math.min((a & 0xff0000) + (b & 0xff0000), 0xff0000)
        int g = Math.min((a & 0xff00) + (b & 0xff00), 0xff00)
        int bl = Math.min((a & 0xff) + (b & 0xff), 0xff)
        return r | g | bl
    }

    /**
     * A composite of labels at its current z and t, into `rgb` (0xRRGGBB, one int per pixel):
     * each active channel coloured as render() colours a single labels image, the channels
     * added (clamped at 255) as ImageJ\'s composite mode adds its channels\' colours.
     */
    static void composite(CompositeImage ci, int[] rgb) {
        int z = ci.getSlice(), t = ci.getFrame()
        ImageStack stack = ci.getImageStack()
        int[] table = colours16()
        int[] colours = colours256()
        boolean[] active = ci.getActiveChannels()
        boolean first = true
        for (int c = 0; c < ci.getNChannels(); c++) {
            if (c < active.length && !active[c]) continue
            Object pixels = stack.getPixels(ci.getStackIndex(c + 1, z, t))
            if (pixels instanceof short[]) {
                short[] p = (short[]) pixels
                if (first) { for (int k = 0; k < rgb.length; k++) rgb[k] = table[p[k] & 0xffff] }
                else { for (int k = 0; k < rgb.length; k++) rgb[k] = add(rgb[k], table[p[k] & 0xffff]) }
            } else if (pixels instanceof byte[]) {
                byte[] p = (byte[]) pixels
                if (first) { for (int k = 0; k < rgb.length; k++) rgb[k] = table[p[k] & 0xff] }
                else { for (int k = 0; k < rgb.length; k++) rgb[k] = add(rgb[k], table[p[k] & 0xff]) }
            } else {
                float[] p = (float[]) pixels
                if (first) { for (int k = 0; k < rgb.length; k++) rgb[k] = colours[index(p[k])] }
                else { for (int k = 0; k < rgb.length; k++) rgb[k] = add(rgb[k], colours[index(p[k])]) }
            }
            first = false
        }
        if (first) Arrays.fill(rgb, 0)  // no channel active: black, as ImageJ draws it
    }
}

/**
 * The CompositeImage of every stream with channels. While it holds labels (`labels`, set by
 * labelView and plainView) it is drawn by LabelColors, as a single labels image is: ImageJ
''')
    s.append(''' * draws a composite\'s channels through their processors\' linear LUT ranges, where ids above
 * 255 share colours. Everything else (LUTs, ranges, positions) stays ImageJ\'s.
 */
@CompileStatic
class LabelCompositeImage extends CompositeImage {
    boolean labels
    java.awt.Image labelImage  // drawn when ImageJ draws (an assignment to its protected `img` compiled to a dynamic property set that had no effect, Groovy 2.4)
    int[] labelPixels  // what labelImage shows in composite mode, reused from draw to draw (as ImageJ reuses its own)
    java.awt.image.BufferedImage labelBuffer

    LabelCompositeImage(ImagePlus imp, int mode) { super(imp, mode) }

    @Override
    synchronized void updateImage() {
        super.updateImage()  // ImageJ\'s bookkeeping (current channel, channel processors, LUTs)
        if (!labels || getNChannels() < 2) {
            labelImage = null
            labelBuffer = null
            labelPixels = null
            return
        }
        int w = getWidth(), h = getHeight()
        if (getMode() != COMPOSITE) {  // colour or grayscale mode: the current channel alone
            labelImage = LabelColors.render(w, h, getImageStack().getPixels(getStackIndex(getChannel(), getSlice(), getFrame())))
            return
        }
        if (labelBuffer == null || labelBuffer.getWidth() != w || labelBuffer.getHeight() != h) {
            labelPixels = new int[w * h]
            java.awt.image.DirectColorModel cm = new java.awt.image.DirectColorModel(24, 0xff0000, 0xff00, 0xff)
            java.awt.image.WritableRaster raster = java.awt.image.Raster.createPackedRaster(
                new java.awt.image.DataBufferInt(labelPixels, labelPixels.length), w, h, w, [0xff0000, 0xff00, 0xff] as int[], null)
            labelBuffer = new java.awt.image.BufferedImage(cm, raster, false, null)
        }
        LabelColors.composite(this, labelPixels)
        labelImage = labelBuffer
    }

    @Override
    java.awt.Image getImage() {
        java.awt.Image own = super.getImage()  // updates if ImageJ dropped its drawing
        return labels && labelImage != null ? labelImage : own
    }
}

@CompileStatic
class LabelShortProcessor extends ij.process.ShortProcessor {
    LabelShortProcessor(int w, int h, short[] pixels) { super(w, h, pixels, null) }

    @Override
    java.awt.Image createImage() { LabelColors.render(getWidth(), getHeight(), getPixels()) }
}

@CompileStatic
class LabelFloatProcessor extends ij.process.FloatProcessor {
    LabelFloatProcessor(int w, int h, float[] pixels) { super(w, h, pixels, null) }

    @Override
    java.awt.Image createImage() { LabelColors.render(getWidth(), getHeight(), getPixels()) }
}

// ==========================================================================================
// 6. Images: one ImagePlus per stream, hyperstack placement, display hints, ROIs
// ==========================================================================================

/** Where a frame (or a ROI set) goes: window title, c/z/t position, the frame\'s own dims. */
@CompileStatic
class Layout {
    static final int C = 0, Z = 1, T = 2
    String title
    int[] pos = new int[3]                // (c, z, t) of the frame\'s first plane
    boolean[] given = new boolean[3]      // which of c, z, t the message positions
    int[] ext = [1, 1, 1] as int[]        // extent of the frame along c, z, t
    int[] leadAxis = new int[0]           // ImageJ axis of each leading dim of the frame
    int[] leadSize = new int[0]
    int rows = 1, cols = 1, planes = 1
    int samples = 1                       // 3 (RGB) or 4 (RGBA) bytes per pixel of an RGB frame
    boolean placed

    /** What an axis name means: c, z or t for those and their synonyms in any case
     * (P.AXIS_SYNONYMS), else the name itself. */
    static String axisName(String name) {
        P.AXIS_SYNONYMS.getOrDefault(name.toLowerCase(), name)
    }

    /** ImageJ\'s axis for an axis name (`axisName`), or -1. */
    static int canonical(String name) {
        switch (axisName(name)) {
            case \'c\': return C
            case \'z\': return Z
            case \'t\': return T
            default: return -1
        }
    }

    /** Layout of a frame (shape given) or of a ROI set (shape null); `rgb`: the frame\'s last
     * dimension holds the colour samples. */
    static Layout of(Map m, List shape, boolean rgb = false) {
        Layout L = new Layout()
        Map<String, Object> axes = (Map<String, Object>) m.get(\'axes\')
        List<String> names = (List<String>) m.get(\'axis_names\')
        StringBuilder suffix = new StringBuilder()
        for (Map.Entry<String, Object> e : axes.entrySet()) {
            int a = canonical(e.key)
            if (a < 0 || L.given[a]) {  // ImageJ has no such axis: one window per value
                suffix.append(suffix.length() == 0 ? \' [\' : \', \').append(e.key).append(\'=\').append(e.value)
            } else {
                L.given[a] = true
                L.pos[a] = (int) (Long) e.value
                L.placed = true
            }
        }
        L.title = m.get(\'stream\').toString() + (suffix.length() > 0 ? suffix.append(\']\').toString() : \'\')
        if (shape == null) return L
        int n = shape.size()
        if (rgb) {  // (..., rows, columns, 3 or 4)
            L.samples = (int) (Long) shape.get(n - 1)
            n--
        }
        L.rows = n >= 2 ? (int) (Long) shape.get(n - 2) : 1
        L.cols = (int) (Long) shape.get(n - 1)
        int lead = Math.max(0, n - 2)
        List<String> leadNames = leadingNames(axes.keySet(), names, lead)
        if (lead > 3) {
            throw new ProtocolError(P.BAD_SHAPE, "a frame of shape ${shape} has ${lead} leading dimensions; ImageJ images have at most c, z and t".toString(), m.get(\'seq\'))
        }
        L.leadAxis = new int[lead]
        L.leadSize = new int[lead]
        boolean[] used = (boolean[]) L.given.clone()
        for (int d = 0; d < lead; d++) {
            int a = canonical(leadNames.get(d))
            if (a < 0 || used[a]) {  // unknown (d0...) or taken: the first free of z, t, c
                a = -1
                for (int x : [Z, T, C]) if (!used[x]) { a = x; break }
            }
            if (a < 0) {
                throw new ProtocolError(P.BAD_SHAPE, "a frame of shape ${shape} at ${axes} needs more dimensions than ImageJ\'s c, z and t".toString(), m.get(\'seq\'))
            }
            used[a] = true
            L.leadAxis[d] = a
            L.leadSize[d] = (int) (Long) shape.get(d)
            L.ext[a] = L.leadSize[d]
            L.planes *= L.leadSize[d]
        }
        return L
    }

    /**
     * Names of a frame\'s `lead` leading dims (docs/protocol.md, the leading-axis rule, as in
     * napari): the entries of `axis_names` that are not keys of `axes` name the outermost ones
     * in order; the others are named, innermost first, from the end of t, c, z, skipping names
     * already used, then d0, d1, ... So one unnamed leading dim is z, two are c, z, three t, c, z.
     */
    static List<String> leadingNames(Collection<String> axes, List<String> axisNames, int lead) {
        String[] out = new String[lead]
        Set<Integer> used = new HashSet<Integer>()
        for (String a : axes) used.add(canonical(a))
        if (axisNames != null) {
            for (String a : axisNames) used.add(canonical(a))
            List<String> rest = axisNames.findAll { String it -> !axes.contains(it) }
            for (int i = 0; i < Math.min(rest.size(), lead); i++) out[i] = rest.get(i)
        }
        List<String> defaults = [\'z\', \'c\', \'t\'] as List<String>  // the end of t, c, z first
        int extra = 0
        for (int d = lead - 1; d >= 0; d--) {
            if (out[d] != null) continue
            String name = defaults.find { String x -> !used.contains(canonical(x)) }
            if (name == null) name = "d${extra++}".toString()
            used.add(canonical(name))
            out[d] = name
        }
        return Arrays.asList(out)
    }

    /** (c, z, t) offset of plane `p` (C order over the leading dims) from the first plane. */
    int[] offsetOf(int p) {
        int[] o = new int[3]
        for (int d = leadAxis.length - 1; d >= 0; d--) {
            o[leadAxis[d]] = p % leadSize[d]
            p = p.intdiv(leadSize[d]) as int
        }
        return o
    }
}

@CompileStatic
class Stream {
    final String title
    ImagePlus imp
    ImageStack stack  // imp\'s stack, kept: ImagePlus.getStack() rescans min and max on every call
    int width, height, bits, C = 1, Z = 1, T = 1
    String how, dtype  // the mode and wire dtype of its frames (null: adopted from an earlier run)
    int[] block  // a frame\'s own extents along c, z, t, and samples per pixel
    final Map<Integer, Integer> stacked = new HashMap<Integer, Integer>()  // stack mode: channel -> frames
    boolean labels, labelLuts  // labelLuts: the channel LUTs are still the labels\' glasbey
    double maxLabel
    long framesReceived
    String unknownColormap
    final Map<Integer, String> colormaps = new TreeMap<Integer, String>()     // channel -> hint
    final Map<Integer, double[]> ranges = new TreeMap<Integer, double[]>()    // channel -> [lo, hi]
    final LinkedHashMap<List, List<Roi>> rois = new LinkedHashMap<List, List<Roi>>()  // by [path, axes]
    int[] last = new int[3]  // (c, z, t) of the newest plane, shown in the GUI
    boolean shown, dirty, displayDirty
    final Map<Integer, double[]> autoRanges = new TreeMap<Integer, double[]>()  // channel -> range set by "auto"
    final Map<Integer, double[]> userRanges = new TreeMap<Integer, double[]>()  // channel -> range the user set by hand
    /** Contrast to follow, by the channels a frame touched: scanned when shown, not per frame. */
    final LinkedHashMap<String, Closure> pendingFollow = new LinkedHashMap<String, Closure>()
    String file, rendered  // the saved TIFF, and a PNG of what its window shows
    long version, savedVersion = -1  // changes, and the change last saved to `file`

    Stream(String title) { this.title = title }

    int roiCount() {
        int n = 0
        for (List<Roi> l : rois.values()) n += l.size()
        return n
    }

    int index(int c, int z, int t) { 1 + c + z * C + t * C * Z }
}

@CompileStatic
class Images {
    final Map<String, Stream> streams = new LinkedHashMap<String, Stream>()
    final String defaultMode
    final int compositeMode
    final boolean gui
    final boolean useRoiManager
    final File outputDir
    long emptyFrames
    long roiIds
    final String runId = Long.toHexString(new Random().nextLong() & 0xffffffffL)  // ROI ids unique across re-runs
    Closure beforeDraw  // sends the acks still held: a frame is acknowledged before it is shown

    Images(String defaultMode, String channelDisplay, boolean gui, boolean useRoiManager, File outputDir) {
        this.defaultMode = defaultMode
        this.compositeMode = channelDisplay == \'color\' ? IJ.COLOR : channelDisplay == \'grayscale\' ? IJ.GRAYSCALE : IJ.COMPOSITE
        this.gui = gui
        this.useRoiManager = useRoiManager
        this.outputDir = outputDir
    }

    /** Warnings and errors: standard error, and with a display also Fiji\'s Log window. */
    void log(String msg) {
        System.err.println("polystore-fiji: ${msg}")
        if (gui) IJ.log("polystore: ${msg}")
    }

    Stream stream(String title) {
        Stream s = streams.get(title)
        if (s == null) {
            s = new Stream(title)
            streams.put(title, s)
        }
        return s
    }

    /**
     * Copy one validated frame into its image, then call `ack` (the copy is ours: the sender
     * may reuse its segment), then apply display hints. Everything that can reject the frame
     * (checkRoom included) runs before the stream is created or its image changed, so a
     * rejected frame leaves no trace; placement itself always succeeds (the image grows or
     * starts over).
     */
    void put(Map f, Layout L, View src, Closure ack) {
        String dtype = (String) f.get(\'dtype\')
        Map display = (Map) f.get(\'display\')
        boolean rgb = L.samples > 1
        long planeValues = (long) L.rows * L.cols
        long planeBytes = planeValues * P.DTYPES.get(dtype) * L.samples
        if (planeValues == 0 || L.planes == 0) {  // nothing ImageJ can show
            ack.call()
            emptyFrames++
            return
        }
        boolean labels = display.get(\'kind\') == \'labels\'
        Stream s = streams.get(L.title)  // created below, once the frame is accepted
        if (s != null) sync(s)
        if (gui && (s == null || s.imp == null)) s = adopt(L.title, s)
        boolean exists = s != null && s.imp != null
        int bits
        try {
            bits = rgb ? 24 : labels ? Pixels.labelBits(src.buffer, src.position, dtype, planeValues * L.planes) : Pixels.bitsFor(dtype)
        } catch (LabelRange e) {
            throw new ProtocolError(P.TOO_LARGE, e.message, f.get(\'seq\'))
        }
        // docs/protocol.md, as napari: a frame\'s mode hint wins; without one a frame with axes
        // (any names) is placed and the others follow the script\'s mode; place without axes replaces
        String hint = (String) display.get(\'mode\')
        boolean hasAxes = !((Map) f.get(\'axes\')).isEmpty()  // other names than c/z/t: placed in their window
        String how = hint == \'place\' || (hint == null && hasAxes) ? (hasAxes ? \'place\' : \'replace\') : (hint ?: defaultMode)
        int[] block = [L.ext[0], L.ext[1], L.ext[2], L.samples] as int[]
        // A stream whose mode, kind, dtype or frame shape changes starts again (as napari); an
        // image adopted from an earlier run (how unknown) is continued where it fits.
        boolean same = exists && s.width == L.cols && s.height == L.rows && (s.how == null
            || (s.how == how && s.labels == labels && s.dtype == dtype && Arrays.equals(s.block, block)))
        int c0 = L.given[Layout.C] ? L.pos[Layout.C] : 0

        // Plan first (where the planes go, the image\'s new dimensions), check there is memory
        // for it, then change the image: a frame that cannot fit is rejected untouched.
        int[] base = (int[]) L.pos.clone()
        long[] dims = new long[3]  // c, z, t after this frame
        boolean restart, promoteFirst = false
        if (how == \'replace\') {  // this frame alone (in its channels, at a c position)
            base = [c0, 0, 0] as int[]
            boolean others = L.given[Layout.C] && same && s.Z == L.ext[1] && s.T == L.ext[2]
            dims = [others ? Math.max(s.C, c0 + L.ext[0]) : c0 + L.ext[0], L.ext[1], L.ext[2]] as long[]
            // the frame overwrites every plane of an image of its size: no new one needed then
            restart = !others && (!exists || s.width != L.cols || s.height != L.rows || s.bits != bits
                || (s.how != null && s.how != how) || c0 > 0 || s.C != dims[0] || s.Z != dims[1] || s.T != dims[2])
        } else if (how == \'stack\') {  // the next time point of its channels, own c and z kept
            if (L.ext[Layout.T] > 1) {
                throw new ProtocolError(P.BAD_SHAPE, "${L.title}: a frame with a t dimension of its own cannot be stacked, ImageJ has one t axis; send it with axes and mode=place".toString(), f.get(\'seq\'))
            }
            restart = !same || s.Z != L.ext[1]  // (an adopted image, or z slices added by hand)
            int t = 0
            // frames a channel has stacked; an image adopted from an earlier run: all of its
            // time points; never beyond the image (frames deleted by hand)
            if (!restart) for (int c = c0; c < c0 + L.ext[0]; c++) t = Math.max(t, Math.min(s.stacked.get(c) ?: (s.how == null ? s.T : 0), s.T))
            base = [c0, 0, t] as int[]
            dims = [restart ? c0 + L.ext[0] : Math.max(s.C, c0 + L.ext[0]), L.ext[1], restart ? t + 1 : Math.max(s.T, t + 1)] as long[]
        } else {  // placed at its c/z/t position; the hyperstack grows to hold it
            restart = !same
            for (int a = 0; a < 3; a++) {
                long need = (long) base[a] + L.ext[a]
                dims[a] = restart ? need : Math.max(need, (long) (a == 0 ? s.C : a == 1 ? s.Z : s.T))
            }
        }
        if (!restart && s.bits != bits && (s.bits == 24 || bits == 24)) {
            throw new ProtocolError(P.BAD_SHAPE, "${L.title} holds ${s.bits == 24 ? \'RGB\' : s.bits + \'-bit\'} images; a ${bits == 24 ? \'RGB\' : dtype} frame cannot join it (send it to another stream, or mode=replace)".toString(), f.get(\'seq\'))
        }
        if (!restart && s.bits != bits) {  // labels that outgrow their type, an adopted image: 32-bit float holds both
            promoteFirst = s.bits != 32
            bits = 32
        }
        if (bits == 24 && dims[0] > 1) {
            throw new ProtocolError(P.BAD_SHAPE, "ImageJ cannot hold several channels of RGB images (${L.title}: c=${dims[0]}); send each channel as a grey frame, or the colours to separate streams".toString(), f.get(\'seq\'))
        }
        long current = restart ? 0 : (long) s.C * s.Z * s.T
        checkRoom(L.title, dims, current, planeValues, bits, promoteFirst, f.get(\'seq\'))
        if (s == null) s = stream(L.title)
        if (promoteFirst) promote(s)
        if (restart) fresh(s, L.cols, L.rows, bits, (int) dims[0], (int) dims[1], (int) dims[2])
        else grow(s, (int) dims[0], (int) dims[1], (int) dims[2])
        s.how = how
        s.dtype = dtype
        s.block = block
        if (restart) s.stacked.clear()
        if (how == \'stack\') for (int c = c0; c < c0 + L.ext[0]; c++) s.stacked.put(c, base[2] + 1)

        ImageStack stack = s.stack
        String label = (String) f.get(\'path\')
        int[] indices = new int[L.planes]
        int[] at = new int[3]
        for (int p = 0; p < L.planes; p++) {
            int[] o = L.offsetOf(p)
            for (int a = 0; a < 3; a++) at[a] = base[a] + o[a]
            indices[p] = s.index(at[0], at[1], at[2])
            if (rgb) Pixels.copyRgb(src.buffer, src.position + p * planeBytes, (int) planeValues, L.samples, (int[]) stack.getPixels(indices[p]))
            else Pixels.copy(src.buffer, src.position + p * planeBytes, dtype, (int) planeValues, stack.getPixels(indices[p]))
        }
        ack.call()

        // The credit is back; what follows only concerns the display and must never fail the frame.
        try {
            s.framesReceived++
            s.last = (int[]) at.clone()
            for (int idx : indices) stack.setSliceLabel(label, idx)
            if (labels != s.labels) { s.labels = labels; s.displayDirty = true }
            if (labels) s.pendingFollow.clear()  // an earlier image frame\'s contrast is moot now
            if (!labels) plainView(s)  // a labels stream that now sends images
            if (labels) {
                double top = how == \'replace\' ? 0 : s.maxLabel  // replace: the image is this frame, its ids only
                for (int idx : indices) top = Math.max(top, Pixels.maxOf(stack.getPixels(idx)))
                if (top != s.maxLabel) { s.maxLabel = top; s.displayDirty = true }
            }
            String cmap = (String) display.get(\'colormap\')
            List limits = (List) display.get(\'contrast_limits\')
            int channels = L.ext[0]
            for (int c = base[0]; c < base[0] + channels; c++) {
                if (cmap != null && s.colormaps.get(c) != cmap) { s.colormaps.put(c, cmap); s.displayDirty = true }
                if (limits != null) {  // lo < hi: checkFrame refused any other hint
                    double[] r = [(double) limits.get(0), (double) limits.get(1)] as double[]
                    if (!Arrays.equals(s.ranges.get(c), r)) { s.ranges.put(c, r); s.displayDirty = true }
                } else {
                    s.ranges.remove(c)  // a hint holds for the frames that carry it (as napari)
                }
            }
            if (s.displayDirty) applyDisplay(s)
            if (!labels && !rgb) {  // the newest frame of each set of channels is followed when drawn
                String key = "${how}:${base[0]}:${channels}"
                boolean hinted = limits != null
                s.pendingFollow.remove(key)
                s.pendingFollow.put(key, { followData(s, stack, indices, L, how, base, hinted) })
            }
            if (labels) labelView(s)
            s.dirty = true
            s.version++
        } catch (ThreadDeath td) {
            throw td
        } catch (Throwable t) {
            log("display of ${s.title} failed: ${t}".toString())
        }
    }

    /**
     * Make the stream\'s idea of its image match the ImagePlus: in Fiji a user may close the
     * window (the next frame opens a new one) or change the image (Image > Type, crop...);
     * then the stack is read again and an image of a type this script does not write (RGB)
     * is started over.
     */
    void sync(Stream s) {
        if (forgetIfClosed(s)) return
        ImagePlus imp = s.imp
        if (imp == null) return
        Object current = imp.getProcessor()?.getPixels()
        if (s.stack != null && imp.getStackSize() == s.stack.getSize() && current != null
            && current.is(s.stack.getPixels(imp.getCurrentSlice()))) return
        s.stack = imp.getStack()
        s.width = imp.getWidth()
        s.height = imp.getHeight()
        s.bits = imp.getBitDepth() in [8, 16, 24, 32] ? imp.getBitDepth() : -1
        s.C = imp.getNChannels()
        s.Z = imp.getNSlices()
        s.T = imp.getNFrames()
        if (s.bits < 0 || s.stack.getPixels(1) == null) s.width = -1  // start over: new stack
    }

    /**
     * The user closed the stream\'s window: ImageJ has flushed its ImagePlus (no processor, no
     * pixels), so forget it; the next frame opens a new window. True if it was closed.
     */
    static boolean forgetIfClosed(Stream s) {
        if (s.imp == null || !s.shown || s.imp.getWindow() != null) return false
        s.imp = null
        s.stack = null
        s.shown = false
        return true
    }

    /** forgetIfClosed for every stream: before anything reads the images (save, describe). */
    void forgetClosed() {
        for (Stream s : streams.values()) forgetIfClosed(s)
    }

    /** What one plane costs beyond its pixels: the array\'s header, its slots in the stack\'s
     * pixel and label arrays (many tiny planes are not free). */
    static final long PLANE_OVERHEAD = 64

    /**
     * Reject (too_large, before anything changes) what ImageJ or the heap cannot hold: a
     * stray `t: 999999` must not allocate terabytes or run Fiji out of memory. `dims` are the
     * image\'s (c, z, t) after the frame, `current` its planes now (kept), `promoteFirst` whether
     * they become 32-bit first. Every product is checked: nothing here may wrap around.
     */
    static void checkRoom(String title, long[] dims, long current, long planeValues, int bits, boolean promoteFirst, Object seq) {
        long bytes
        try {
            for (long d : dims) if (d > Integer.MAX_VALUE - 8) throw new ArithmeticException()
            long planes = Math.multiplyExact(Math.multiplyExact(dims[0], dims[1]), dims[2])
            if (planes > Integer.MAX_VALUE - 8) throw new ArithmeticException()
            long planeBytes = Math.addExact(Math.multiplyExact(planeValues, (long) Pixels.bytesPerPixel(bits)), PLANE_OVERHEAD)
            bytes = Math.multiplyExact(planes - current, planeBytes)
            if (promoteFirst) bytes = Math.addExact(bytes, Math.multiplyExact(current, Math.multiplyExact(planeValues, 4L)))
        } catch (ArithmeticException ignored) {
            throw new ProtocolError(P.TOO_LARGE, "${title} would need ${dims[0]} x ${dims[1]} x ${dims[2]} (c x z x t) planes; an ImageJ stack holds fewer than 2^31".toString(), seq)
        }
        Runtime rt = Runtime.getRuntime()
        for (int attempt = 0; attempt < 2 && bytes > 0; attempt++) {
            long available = rt.maxMemory() - (rt.totalMemory() - rt.freeMemory())
            if (bytes < available * 0.8) return
            if (attempt == 0) System.gc()  // garbage of earlier frames may be what fills the heap
            else {
                throw new ProtocolError(P.TOO_LARGE, "${title} would need ${bytes >> 20} MiB more, but only ${available >> 20} MiB of Java memory are free (Fiji: Edit > Options > Memory & Threads)".toString(), seq)
            }
        }
    }

    /** A new stack of the given geometry (pixel arrays allocated zeroed). */
    void fresh(Stream s, int w, int h, int bits, int C, int Z, int T) {
        ImageStack stack = new ImageStack(w, h)
        int n = C * Z * T  // < 2^31: checkRoom
        for (int k = 0; k < n; k++) stack.addSlice(\'\', Pixels.newPlane(bits, w * h))
        s.width = w
        s.height = h
        s.bits = bits
        s.maxLabel = 0
        setStack(s, stack, C, Z, T)
    }

    /** Grow to (C, Z, T), moving (not copying) the existing planes to their new indices. */
    void grow(Stream s, int C, int Z, int T) {
        if (C == s.C && Z == s.Z && T == s.T) return
        ImageStack old = s.stack
        ImageStack stack
        if (C == s.C && (Z == s.Z || (s.T == 1 && T == 1))) {  // new planes go last: append (live case)
            stack = old
            for (int k = s.C * s.Z * s.T; k < C * Z * T; k++) stack.addSlice(\'\', Pixels.newPlane(s.bits, s.width * s.height))
        } else {
            stack = new ImageStack(s.width, s.height)
            for (int t = 0; t < T; t++) for (int z = 0; z < Z; z++) for (int c = 0; c < C; c++) {
                if (c < s.C && z < s.Z && t < s.T) {
                    int idx = s.index(c, z, t)
                    stack.addSlice(old.getSliceLabel(idx), old.getPixels(idx))
                } else {
                    stack.addSlice(\'\', Pixels.newPlane(s.bits, s.width * s.height))
                }
            }
        }
        setStack(s, stack, C, Z, T)
    }

    /** Turn the stream into 32-bit float, values kept (a frame of another type arrived). */
    void promote(Stream s) {
        ImageStack old = s.stack
        ImageStack stack = new ImageStack(s.width, s.height)
        for (int k = 1; k <= old.getSize(); k++) stack.addSlice(old.getSliceLabel(k), Pixels.toFloat(old.getPixels(k)))
        s.bits = 32
        setStack(s, stack, s.C, s.Z, s.T)
        s.displayDirty = true
    }

    void setStack(Stream s, ImageStack stack, int C, int Z, int T) {
        noticeHandChanges(s)  // before the rebuild, which may reset what ImageJ shows
        if (s.imp == null) {
            s.imp = new ImagePlus(s.title, stack)
            s.imp.setProperty(MADE_HERE, s.title)
            s.imp.setDimensions(C, Z, T)
            attachRois(s)
        } else {
            // ImageJ draws at most 8 channels at once (CompositeImage.MAX_CHANNELS): a shown
            // composite given a 9th in composite mode threw in updateImage (index 8). As for an
            // image made with 9 or more, ImageJ\'s own choice: one channel at a time.
            if (C > CompositeImage.MAX_CHANNELS && s.imp instanceof CompositeImage && ((CompositeImage) s.imp).getMode() == IJ.COMPOSITE) ((CompositeImage) s.imp).setMode(IJ.COLOR)
            s.imp.setStack(stack, C, Z, T)  // same ImagePlus (and window), new size or type allowed
        }
        s.stack = stack
        s.C = C
        s.Z = Z
        s.T = T
        s.imp.setOpenAsHyperStack(C > 1 || T > 1)
        // Channels appear: a composite, so each gets its own LUT. Channels gone: a plain image
        // again (ImageJ draws a composite of one channel through neither its LUT nor its range).
        if ((C > 1 && !s.imp.isComposite()) || (C == 1 && s.imp instanceof CompositeImage)) remake(s)
        s.displayDirty = true
        keepRanges(s)
    }

    /** A new ImagePlus of the stream\'s stack and dimensions in place of its image (whose window,
     * if shown, is closed): a LabelCompositeImage with channels, a plain image without. */
    void remake(Stream s) {
        ImagePlus old = s.imp
        ImageStack stack = s.stack
        // The new image gets its own ImageStack object holding the same pixel arrays:
        // closing the old window flushes (nulls) the old stack object\'s slots.
        ImageStack own = new ImageStack(stack.getWidth(), stack.getHeight())
        for (int k = 1; k <= stack.getSize(); k++) own.addSlice(stack.getSliceLabel(k), stack.getPixels(k))
        ImagePlus plain = new ImagePlus(s.title, own)
        plain.setDimensions(s.C, s.Z, s.T)
        plain.setOpenAsHyperStack(s.C > 1 || s.T > 1)
        ImagePlus next = s.C > 1 ? new LabelCompositeImage(plain, compositeMode) : plain
        next.setTitle(s.title)
        next.setProperty(MADE_HERE, s.title)
        next.setOverlay(old.getOverlay())
        s.imp = next
        s.stack = own
        if (s.shown) {
            old.changes = false
            old.close()
            s.shown = false
        }
    }

    void applyDisplay(Stream s) {
        s.displayDirty = false
        if (s.imp == null || s.bits == 24) return
        s.unknownColormap = null
        for (int c = 0; c < s.C; c++) {
            String name = s.labels ? \'glasbey\' : s.colormaps.get(c)
            LUT lut = null
            if (name != null) {
                lut = Luts.get(name)
                if (lut == null) { s.unknownColormap = name; lut = Luts.get(\'grays\') }
            }
            double[] range = s.labels ? ([0d, Math.max(255d, s.maxLabel)] as double[]) : s.ranges.get(c)
            if (range != null) s.autoRanges.remove(c)  // a hint, not a range to follow or to take for the user\'s
            if (s.imp instanceof CompositeImage) {
                CompositeImage ci = (CompositeImage) s.imp
                LUT current = ci.getChannelLut(c + 1)
                if (lut == null && s.labelLuts && !s.labels) {  // no longer labels: the channel\'s own colour again
''')
    s.append('''                    lut = ci.createLutFromColor(CompositeImage.colors[c % CompositeImage.colors.length])
                }
                LUT l = (LUT) (lut ?: current).clone()
                if (range != null) { l.min = range[0]; l.max = range[1] }
                else if (lut != null) { l.min = current.min; l.max = current.max }
                setChannelLut(ci, l, c + 1)
            } else {
                if (lut != null) s.imp.setLut(lut)
                if (range != null) s.imp.setDisplayRange(range[0], range[1])
            }
        }
        if (s.imp instanceof CompositeImage) ((CompositeImage) s.imp).setMode(compositeMode)
        s.labelLuts = s.labels
    }

    // -- contrast (docs/protocol.md, the contrast rule) ------------------------------------

    double[] rangeOf(Stream s, int c) {
        if (s.imp instanceof CompositeImage) {
            LUT l = ((CompositeImage) s.imp).getChannelLut(c + 1)
            return [l.min, l.max] as double[]
        }
        return [s.imp.getDisplayRangeMin(), s.imp.getDisplayRangeMax()] as double[]
    }

    void setRange(Stream s, int c, double lo, double hi) {
        if (s.imp instanceof CompositeImage) {
            CompositeImage ci = (CompositeImage) s.imp
            LUT l = (LUT) ci.getChannelLut(c + 1).clone()
            l.min = lo
            l.max = hi
            setChannelLut(ci, l, c + 1)
        } else {
            s.imp.setDisplayRange(lo, hi)
        }
    }

    /**
     * A channel\'s LUT (and range). ImageJ draws the current channel at the image\'s range, so
     * that is set too. With a window, ImageJ\'s setChannelLut also puts the LUT into the current
     * channel\'s processor whatever the display mode, which in grayscale mode drew that channel
     * in its colour from the next frame\'s contrast on: there it gets the gray ImageJ\'s
     * setMode(GRAYSCALE) gives it back.
     */
    static void setChannelLut(CompositeImage ci, LUT l, int channel) {
        ci.setChannelLut(l, channel)
        if (ci.getChannel() != channel) return
        ij.process.ImageProcessor ip = ci.getProcessor()
        if (ci.getMode() == CompositeImage.GRAYSCALE && ip != null) ip.setColorModel(ip.getDefaultColorModel())
        ci.setDisplayRange(l.min, l.max)
    }

    List<List<Double>> followAndRanges(Stream s) {
        followPending(s)
        return displayRanges(s)
    }

    List<List<Double>> displayRanges(Stream s) {
        List<List<Double>> out = []
        if (s.bits == 24) return out
        for (int c = 0; c < s.C; c++) {
            double[] r = rangeOf(s, c)
            out.add([r[0], r[1]] as List<Double>)
        }
        return out
    }

    /**
     * Without contrast_limits the displayed range follows the data: each new frame\'s min..max,
     * per channel, until the user sets that channel\'s contrast by hand (then it stays theirs).
     * A hand-set range is told apart from ours by comparing with what we set last; headless
     * nobody can touch it.
     */
    void followData(Stream s, ImageStack stack, int[] indices, Layout L, String how, int[] base, boolean hinted) {
        Map<Integer, double[]> seen = new TreeMap<Integer, double[]>()
        for (int p = 0; p < indices.length; p++) {
            int c = base[0] + L.offsetOf(p)[0]
            if (c >= s.C) continue  // the image was rebuilt with fewer channels since this frame
            if (hinted || s.ranges.containsKey(c)) continue  // fixed by a hint
            double[] mm = Pixels.minMax(stack.getPixels(indices[p]))
            double[] acc = seen.get(c)
            seen.put(c, acc == null ? mm : ([Math.min(acc[0], mm[0]), Math.max(acc[1], mm[1])] as double[]))
        }
        noticeHandChanges(s)
        for (Map.Entry<Integer, double[]> e : seen.entrySet()) {
            int c = e.key
            if (s.userRanges.containsKey(c)) continue
            double lo = e.value[0], hi = e.value[1]
            if (!(hi > lo)) hi = Pixels.above(lo)  // a flat frame
            setRange(s, c, lo, hi)
            s.autoRanges.put(c, rangeOf(s, c))
        }
    }

    /**
     * GUI only: a channel whose shown range is no longer the one this script set last was
     * changed by hand (Brightness/Contrast, a macro\'s setMinAndMax); from then on its range
     * is the user\'s, and a later change by hand replaces it.
     */
    void noticeHandChanges(Stream s) {
        if (!gui || s.imp == null || s.bits == 24) return
        int channels = Math.min(s.C, s.imp.getNChannels())
        for (int c = 0; c < channels; c++) {
            double[] now = rangeOf(s, c), auto = s.autoRanges.get(c)
            if (s.userRanges.containsKey(c) || (auto != null && !Arrays.equals(now, auto))) s.userRanges.put(c, now)
        }
    }

    /** After the image was rebuilt (grown, retyped, made a composite), when ImageJ may have
     * reset its display ranges: the user\'s ranges are put back, and what is shown now is what
     * a later hand change is told apart from. */
    void keepRanges(Stream s) {
        if (s.imp == null || s.bits == 24) return
        for (int c = 0; c < Math.min(s.C, s.imp.getNChannels()); c++) {
            double[] user = s.userRanges.get(c)
            double[] auto = s.autoRanges.get(c)
            if (user != null) setRange(s, c, user[0], user[1])
            else if (auto != null) {
                // the range it followed, not the one ImageJ reset it to: a channel that gets
                // no new frame would show that one until it did (one gained channel turned
                // the others\' [10, 15] into [0, 5])
                setRange(s, c, auto[0], auto[1])
                s.autoRanges.put(c, rangeOf(s, c))
            }
        }
    }

    /** Labels are drawn through LabelColors: a single-channel image by its processor, a
     * composite (channels) by LabelCompositeImage. */
    void labelView(Stream s) {
        ImagePlus imp = s.imp
        if (imp instanceof LabelCompositeImage) ((LabelCompositeImage) imp).labels = true
        if (imp == null || imp instanceof CompositeImage) return
        ij.process.ImageProcessor ip = imp.getProcessor()
        if (isLabelView(ip)) return
        double lo = ip.getMin(), hi = ip.getMax()
        ij.process.ImageProcessor view = null
        if (ip.getPixels() instanceof short[]) view = new LabelShortProcessor(ip.getWidth(), ip.getHeight(), (short[]) ip.getPixels())
        else if (ip.getPixels() instanceof float[]) view = new LabelFloatProcessor(ip.getWidth(), ip.getHeight(), (float[]) ip.getPixels())
        if (view == null) return
        view.setMinAndMax(lo, hi)
        imp.setProcessor(view)
    }

    /** Undo labelView: an image is drawn through its LUT and display range again. */
    void plainView(Stream s) {
        ImagePlus imp = s.imp
        if (imp instanceof LabelCompositeImage) ((LabelCompositeImage) imp).labels = false
        if (imp == null) return
        ij.process.ImageProcessor ip = imp.getProcessor()
        if (!isLabelView(ip)) return
        ij.process.ImageProcessor view = ip.getPixels() instanceof short[]
            ? new ij.process.ShortProcessor(ip.getWidth(), ip.getHeight(), (short[]) ip.getPixels(), null)
            : new ij.process.FloatProcessor(ip.getWidth(), ip.getHeight(), (float[]) ip.getPixels(), null)
        view.resetMinAndMax()
        imp.setProcessor(view)
    }

    /** Whether `ip` draws labels (labelView\'s processors). By class name: an image an earlier
     * run left open holds that run\'s classes (each run loads the receiver anew). */
    static boolean isLabelView(ij.process.ImageProcessor ip) {
        String name = ip == null ? \'\' : ip.getClass().getSimpleName()
        return name == \'LabelShortProcessor\' || name == \'LabelFloatProcessor\'
    }

    /** Marks the images this script makes (an image property, kept by ImageJ for the session). */
    static final String MADE_HERE = \'polystore_stream\'

    /** Re-runs in one Fiji session: a window left open by an earlier run with this stream\'s
     * title is taken over (its image goes on), instead of a second window of the same title.
     * Only an image an earlier run made: a user\'s own image of that title is never touched. */
    Stream adopt(String title, Stream s) {
        ImagePlus open = null
        for (int id : (ij.WindowManager.getIDList() ?: new int[0])) {
            ImagePlus imp = ij.WindowManager.getImage(id)
            // ours (a window the user renamed to keep is left alone) and still of this title
            if (imp != null && imp.getWindow() != null && imp.getProperty(MADE_HERE) == title
                    && imp.getTitle() == title) { open = imp; break }
        }
        if (open == null) return s
        for (Stream other : streams.values()) if (other.imp.is(open)) return s
        if (s == null) s = stream(title)
        s.imp = open
        s.shown = true
        s.stack = null
        sync(s)
        if (s.width > 0) takeOver(s)
        return s
    }

    /**
     * The image of an earlier run is of that run\'s classes (each run loads the receiver anew).
     * Its label processor is recognised by name (isLabelView); a composite becomes this run\'s
     * LabelCompositeImage (LUTs, mode, position and window place kept), whose labels flag
     * labelView and plainView set. The stream knows it showed labels, and the next frame\'s
     * labelView or plainView does the rest.
     */
    void takeOver(Stream s) {
        ImagePlus old = s.imp
        boolean wasLabels = isLabelView(old.getProcessor())
        if (old instanceof CompositeImage && !(old instanceof LabelCompositeImage) && s.C > 1) {
            CompositeImage ci = (CompositeImage) old
            if (old.getClass().getSimpleName() == \'LabelCompositeImage\') {
                for (String getter : [\'isLabels\', \'getLabels\']) {
                    try {
                        wasLabels = old.getClass().getMethod(getter).invoke(old) == Boolean.TRUE
                        break
                    } catch (ReflectiveOperationException ignored) {
                    }
                }
            }
            LUT[] luts = ci.getLuts()
            int mode = ci.getMode(), c = ci.getChannel(), z = ci.getSlice(), t = ci.getFrame()
            java.awt.Point where = old.getWindow()?.getLocation()
            remake(s)
            CompositeImage next = (CompositeImage) s.imp
            next.setLuts(luts)
            next.setMode(mode)
            next.setPosition(c, z, t)
            ((LabelCompositeImage) next).labels = wasLabels
            if (where != null) ij.gui.ImageWindow.setNextLocation(where)
            next.show()  // in the old window\'s place, before another window takes it
            s.shown = true
        }
        s.labels = wasLabels
        s.labelLuts = wasLabels
    }

    /** LUT name per channel as reported: the hint that was applied, or \'grays\'/\'default\'. */
    List<String> lutNames(Stream s) {
        List<String> out = []
        for (int c = 0; c < s.C; c++) {
            String name = s.labels ? \'glasbey\' : s.colormaps.get(c)
            if (s.bits == 24) out.add(\'rgb\')
            else out.add(name == null ? \'default\' : (Luts.get(name) == null ? \'grays\' : name.toLowerCase()))
        }
        return out
    }

    // -- ROIs -----------------------------------------------------------------------------

    static Roi makeRoi(Map r) {
        List<List<Double>> pts = (List<List<Double>>) r.get(\'coords\')
        double[] x = new double[pts.size()], y = new double[pts.size()]
        for (int k = 0; k < pts.size(); k++) { y[k] = pts.get(k).get(0); x[k] = pts.get(k).get(1) }
        float[] fx = new float[x.length], fy = new float[y.length]
        for (int k = 0; k < x.length; k++) { fx[k] = (float) x[k]; fy[k] = (float) y[k] }
        switch ((String) r.get(\'kind\')) {
            case \'polygon\':
                return new PolygonRoi(new FloatPolygon(fx, fy), Roi.POLYGON)
            case \'rectangle\':
                return new Roi(Math.min(x[0], x[1]), Math.min(y[0], y[1]), Math.abs(x[1] - x[0]), Math.abs(y[1] - y[0]))
            case \'ellipse\':
                return new OvalRoi(Math.min(x[0], x[1]), Math.min(y[0], y[1]), Math.abs(x[1] - x[0]), Math.abs(y[1] - y[0]))
            case \'line\':  // more than two points: an open path (a segmented line)
                if (x.length > 2) return new PolygonRoi(new FloatPolygon(fx, fy), Roi.POLYLINE)
                return new Line(x[0], y[0], x[1], y[1])
            default:  // one point, or several (a multi-point ROI)
                return x.length > 1 ? new PointRoi(fx, fy, fx.length) : new PointRoi(x[0], y[0])
        }
    }

    /** ROIs of one path at one position (axes); a later message for the same path and position
     *  replaces the earlier one, like overwriting a file (docs/protocol.md); others stay. */
    void putRois(Map m, Layout L) {
        Stream s = stream(L.title)
        forgetIfClosed(s)  // not onto the flushed image of a closed window
        String path = (String) m.get(\'path\')
        List<Roi> list = []
        int n = 0
        for (Object o : (List) m.get(\'rois\')) {
            Map r = (Map) o
            Roi roi = makeRoi(r)
            roi.setName((String) (r.get(\'label\') ?: "${path}#${n}".toString()))
            roi.setProperty(\'polystore_stream\', (String) m.get(\'stream\'))
            roi.setProperty(\'polystore_path\', path)
            roi.setProperty(\'polystore_id\', "${runId}:${++roiIds}".toString())
            if (L.placed) {
                roi.setPosition(L.given[0] ? L.pos[0] + 1 : 0, L.given[1] ? L.pos[1] + 1 : 0, L.given[2] ? L.pos[2] + 1 : 0)
            }
            list.add(roi)
            n++
        }
        Map<String, Object> position = new TreeMap<String, Object>()  // axis synonyms as one name
        for (Map.Entry<String, Object> e : ((Map<String, Object>) (m.get(\'axes\') ?: [:])).entrySet()) {
            position.put(Layout.axisName(e.key), e.value)
        }
        List key = [path, position]
        List<Roi> old = s.rois.remove(key)  // the newest goes last, as in napari
        s.rois.put(key, list)
        if (gui && useRoiManager && old != null) removeFromRoiManager(old)
        attachRois(s)
        s.dirty = true
        s.version++
    }

    /** The stream\'s ROIs as the Overlay of its image (and in the ROI Manager with a display). */
    void attachRois(Stream s) {
        if (s.imp == null) return  // kept until the stream\'s first frame
        Overlay ov = new Overlay()
        for (List<Roi> l : s.rois.values()) for (Roi r : l) ov.add(r)
        s.imp.setOverlay(ov.size() > 0 ? ov : null)
        if (gui && useRoiManager) addToRoiManager(s)
    }

    // The ROI Manager keeps copies, so ours are recognised by their polystore_id property. It is a
    // Swing list: changed from this thread while its window paints, AWT throws. So every change
    // runs on the event thread.
    void addToRoiManager(Stream s) {
        onEventThread {
            ij.plugin.frame.RoiManager rm = ij.plugin.frame.RoiManager.getRoiManager()
            Set<String> present = new HashSet<String>()
            for (Roi r : rm.getRoisAsArray()) if (r.getProperty(\'polystore_id\') != null) present.add(r.getProperty(\'polystore_id\'))
            for (List<Roi> l : s.rois.values()) for (Roi r : l) {
                if (!present.contains(r.getProperty(\'polystore_id\'))) rm.add(s.imp, r, -1)
            }
        }
    }

    /** Delete these (by polystore_id) from the ROI Manager. ImageJ deletes only what is selected
     *  (`delete(int)` came in 1.54k), and selecting one item puts it on the current image in
     *  place of the user\'s selection; so the list is rebuilt without them (the manager keeps
     *  copies, and adding clones again). Costs one re-add per other ROI in the manager. */
    void removeFromRoiManager(Collection<Roi> rois) {
        Set<String> drop = new HashSet<String>()
        for (Roi r : rois) drop.add(r.getProperty(\'polystore_id\'))
        onEventThread {
            ij.plugin.frame.RoiManager rm = ij.plugin.frame.RoiManager.getInstance()
            if (rm == null) return
            Roi[] all = rm.getRoisAsArray()
            List<Roi> others = new ArrayList<Roi>()
            for (Roi r : all) if (!drop.contains(r.getProperty(\'polystore_id\'))) others.add(r)
            if (others.size() == all.length) return
            rm.reset()
            for (Roi r : others) rm.add(r, -1)
        }
    }

    /** Run `work` on AWT\'s event thread and wait for it; its exception is thrown here. */
    static void onEventThread(Closure work) {
        if (java.awt.EventQueue.isDispatchThread()) { work.call(); return }
        try {
            java.awt.EventQueue.invokeAndWait(work as Runnable)
        } catch (java.lang.reflect.InvocationTargetException e) {
            throw e.getCause()
        }
    }

    // -- display, report, save, clear ------------------------------------------------------

    /** GUI only: show new windows and redraw changed ones (called at most ~20 times a second). */
    /** Follow the data\'s contrast for the frames received since the last look (display, report). */
    void followPending(Stream s) {
        if (s.pendingFollow.isEmpty()) return
        List<Closure> pending = new ArrayList<Closure>(s.pendingFollow.values())
        s.pendingFollow.clear()
        for (Closure follow : pending) {
            try {
                follow.call()
            } catch (Exception e) {  // one frame\'s contrast must not cost the others theirs
                log("${s.title}: could not follow the contrast of a frame: ${e}".toString())
            }
        }
    }

    /** A stack shows its newest plane (c, z, t of the frame received last), in a window and in
     * the headless PNG alike. */
    static void showNewest(Stream s) {
        if (s.C * s.Z * s.T > 1) s.imp.setPosition(s.last[0] + 1, s.last[1] + 1, s.last[2] + 1)
    }

    void refresh() {
        if (beforeDraw != null) beforeDraw.call()
        forgetClosed()
        for (Stream s : streams.values()) {
            if (!s.dirty || s.imp == null) continue
            s.dirty = false
            followPending(s)
            showNewest(s)
            if (!s.shown) { s.imp.show(); s.shown = true }
            else s.imp.updateAndDraw()
        }
    }

    List<Map> describe() {
        forgetClosed()  // a closed window\'s image is gone: not shown, nothing to describe
        List<Map> out = []
        for (Stream s : streams.values()) {
            ImagePlus imp = s.imp
            out.add([
                title: s.title, width: imp ? imp.getWidth() : 0, height: imp ? imp.getHeight() : 0,
                channels: imp ? imp.getNChannels() : 0, slices: imp ? imp.getNSlices() : 0,
                frames: imp ? imp.getNFrames() : 0, bitDepth: imp ? imp.getBitDepth() : 0,
                rois: s.roiCount(), overlay: imp?.getOverlay() ? imp.getOverlay().size() : 0,
                framesReceived: s.framesReceived, labels: s.labels, composite: imp ? imp.isComposite() : false,
                luts: lutNames(s), unknownColormap: s.unknownColormap, file: s.file, shown: s.shown,
                displayRanges: imp ? followAndRanges(s) : [], userRanges: new ArrayList(s.userRanges.keySet()), rendered: s.rendered,
            ] as Map)
        }
        return out
    }

    /** Save every image changed since its last save as <title>.tif in the output directory
     * (for checks from outside the JVM). */
    void save() {
        if (outputDir == null) return
        forgetClosed()  // ImageJ flushed the image of a closed window: nothing to save
        outputDir.mkdirs()
        Set<String> names = new HashSet<String>()
        for (Stream s : streams.values()) {
            if (s.imp == null) continue
            followPending(s)  // the newest frames\' contrast, as the report gives it and a window shows it
            String base = s.title.replaceAll(\'[^A-Za-z0-9._-]+\', \'_\')
            // a file name holds 255 bytes, a stream name 256 characters (a title more)
            if (base.length() > 200) base = base.substring(0, 190) + \'_\' + String.format(\'%08x\', s.title.hashCode())
            String name = base
            for (int k = 2; !names.add(name); k++) name = "${base}_${k}".toString()
            File f = new File(outputDir, name + \'.tif\')
            if (s.savedVersion == s.version && f.path == s.file && f.isFile()) continue
            if (!new FileSaver(s.imp).saveAsTiff(f.path)) throw new IOException("could not save ${f}".toString())
            s.imp.setTitle(s.title)  // FileSaver renames the image after its file
            File png = new File(outputDir, name + \'.png\')  // what the window shows (LUTs, labels, overlay)
            try {
                // Headless nothing else moves a stack to its newest plane (the GUI: refresh()), and
                // an image keeps its first drawing until told (no window redraws it).
                if (!gui) showNewest(s)
                s.imp.updateAndDraw()
                ImagePlus shown = s.imp.flatten()
                if (!new FileSaver(shown).saveAsPng(png.path)) throw new IOException("could not save ${png}".toString())
                s.rendered = png.path
            } catch (IOException e) {
                throw e
            } catch (Exception e) {
                log("could not render ${s.title}: ${e}".toString())
            }
            s.imp.changes = false
            s.file = f.path
            s.savedVersion = s.version
        }
    }

    void clear() {
        List<Roi> all = []  // one rebuild of the ROI Manager for every stream\'s ROIs
        for (Stream s : streams.values()) {
            for (List<Roi> l : s.rois.values()) all.addAll(l)
            if (s.imp != null && s.shown) { s.imp.changes = false; s.imp.close() }
        }
        if (gui && useRoiManager) removeFromRoiManager(all)
        streams.clear()
    }
}

// ==========================================================================================
// 7. The receiver (protocol.md: hello/welcome, Validation order, ack after the copy, control,
//    bye); the mirror of polystore/streaming/receiver.py
// ==========================================================================================

@CompileStatic
class SenderInfo {
    String prefix
    boolean shm  // its hello\'s probe proved it shares our /dev/shm as this user
    long dropped  // the sender\'s own count of frames it never sent (its header\'s `dropped`)
    boolean batchAcks  // its hello asked for the acks of several frames in one message
}

@CompileStatic
class Core {
    final Images images
    final SegmentReader reader = new SegmentReader(64)
    // in access order: the sender heard from least recently first (see hello)
    final Map<String, SenderInfo> senders = new LinkedHashMap<String, SenderInfo>(16, 0.75f, true)
    final int maxSenders
    final String id = Long.toHexString(new Random().nextLong() & 0xffffffffffffL)
    final long pid = Long.parseLong(ManagementFactory.getRuntimeMXBean().getName().split(\'@\')[0])
    long frames, rois, bytes, rejected, missing, senderDropped, shmFrames, inlineFrames
    volatile long authRefused  // connections refused at the handshake (ZAP thread)
    double fps
    String lastError = \'\'

    Core(Images images, int maxSenders) { this.images = images; this.maxSenders = maxSenders }

    /**
     * One message: `parts` are the parts after the routing id (at most the first 2 kept),
     * `count` how many there were. Every reply goes through `reply`; nothing escapes.
     */
    void handle(String identity, List<byte[]> parts, int count, Closure reply) {
        Object seq = null
        try {
            if (count < 1 || count > 2) throw new ProtocolError(P.BAD_MESSAGE, "expected 1 or 2 message parts, got ${count}".toString(), null)
            Map m = Messages.decode(parts.get(0))  // steps 1-4
            String type = (String) m.get(\'type\')
            seq = m.get(\'seq\')
            byte[] payload = count == 2 ? parts.get(1) : null
            if (type == \'hello\') { reply.call(hello(identity, m)); return }
            if (type == \'bye\') { bye(identity); return }
            SenderInfo sender = senders.get(identity)
            if (sender == null) throw new ProtocolError(P.HELLO_REQUIRED, \'send hello first (receiver restarted?)\', seq)  // step 5
            if (type == \'frame\') {
                frame(sender, m, payload, reply)
            } else if (type == \'rois\') {
                Messages.checkRois(m)
                images.putRois(m, Layout.of(m, null))
                rois++
                reply.call(P.ack(seq))
            } else {  // control
                if (m.get(\'command\') == \'clear\') {
                    images.clear()
                    reply.call(P.ack(seq))
                } else {
                    reply.call(P.report(seq, report()))
                }
            }
        } catch (ProtocolError e) {
            reject(identity, e.code, e.message, e.seq != null ? e.seq : seq, reply)
        } catch (ThreadDeath td) {
            throw td
        } catch (Throwable t) {  // never die on a message (OutOfMemoryError included)
            StringWriter trace = new StringWriter()
            t.printStackTrace(new PrintWriter(trace))
            images.log("internal error handling a message: ${trace}".toString())
            reject(identity, P.INTERNAL, "internal receiver error: ${t}".toString(), seq, reply)
        }
    }

    Map hello(String identity, Map h) {
        if (!((List) h.get(\'versions\')).contains((Object) Long.valueOf(P.VERSION))) {
            throw new ProtocolError(P.UNSUPPORTED_VERSION, "sender speaks versions ${h.get(\'versions\')}; this receiver speaks ${P.VERSION}".toString(), null)
        }
        String expected = "${Local.SHM_PREFIX}${h.get(\'pid\')}_${h.get(\'sender\')}_".toString()
        if (h.get(\'segment_prefix\') != expected) {
            throw new ProtocolError(P.BAD_SEGMENT, "segment_prefix must be ${Json.quote(expected)} (prefix ${Json.quote(Local.SHM_PREFIX)} of this fiji receiver, then pid and sender token); got ${Json.quote((String) h.get(\'segment_prefix\'))}".toString(), null)
        }
        for (Map.Entry<String, SenderInfo> e : senders.entrySet()) {  // (iterating keeps the order)
            if (e.value.prefix == expected && e.key != identity) {
                throw new ProtocolError(P.BAD_SEGMENT, "segment prefix ${Json.quote(expected)} belongs to another connection; each sender needs its own token".toString(), null)
            }
        }
        boolean shm = false
        Map probe = (Map) h.get(\'probe\')
        if (probe != null && probe.get(\'segment\') == expected + \'probe\') {
            String token = (String) probe.get(\'token\')
            try {
                View v = reader.view((String) probe.get(\'segment\'), 0, token.length())
                byte[] got = new byte[token.length()]
                Pixels.at(v.buffer, v.position).get(got)
                shm = Arrays.equals(got, token.getBytes(StandardCharsets.US_ASCII))
            } catch (SegmentError ignored) {
                shm = false
            }
            reader.forgetPrefix((String) probe.get(\'segment\'))
        }
        // JeroMQ says nothing when a connection closes, so a sender that died without `bye`
        // would keep its place for good: at the cap, the sender heard from least recently
        // makes room (it gets hello_required if it sends again), not one still streaming.
        if (!senders.containsKey(identity) && senders.size() >= maxSenders) {
            bye(senders.keySet().iterator().next())
        }
        // The same sender (routing id) saying hello again keeps its baseline: its `dropped`
        // is cumulative, and what it dropped before is counted already.
        SenderInfo known = senders.get(identity)
        senders.put(identity, new SenderInfo(prefix: expected, shm: shm, dropped: known != null ? known.dropped : 0L,
                batchAcks: h.get(\'batch_acks\') == Boolean.TRUE))
        return P.welcome(id, Local.VIEWER, pid, shm, Local.MAX_FRAME_BYTES)
    }

    /** Whether the sender `identity` takes the acks of several frames in one message. */
    boolean batchAcks(String identity) {
        SenderInfo s = senders.get(identity)
        return s != null && s.batchAcks
    }

    void bye(String identity) {
        SenderInfo s = senders.remove(identity)
        if (s != null) reader.forgetPrefix(s.prefix)
    }

    void frame(SenderInfo sender, Map f, byte[] payload, Closure reply) {
        Object seq = f.get(\'seq\')
        Messages.checkFrame(f)  // step 6
        long nbytes = (Long) f.get(\'nbytes\')
        String segment = (String) f.get(\'segment\')
        View view
        if (segment == null) {  // step 7, inline
            if (payload == null || payload.length != nbytes) {
                throw new ProtocolError(P.BAD_SHAPE, "inline frame needs exactly ${nbytes} payload bytes, got ${payload == null ? \'no payload\' : payload.length + \' bytes\'}".toString(), seq)
            }
            view = new View(buffer: ByteBuffer.wrap(payload), position: 0)
        } else {  // step 7, shared memory
            if (payload != null) throw new ProtocolError(P.BAD_MESSAGE, \'a frame names a segment or carries a payload, not both\', seq)
            if (!sender.shm) {  // only a probe binds segment names to this connection
                throw new ProtocolError(P.BAD_SEGMENT, "this connection\'s hello did not prove it shares this machine\'s shared memory as this user (probe); send the pixels inline", seq)
            }
            if (!segment.startsWith(sender.prefix)) {
                throw new ProtocolError(P.BAD_SEGMENT, "segment ${Json.quote(segment)} is not one of this sender\'s (${sender.prefix}*)".toString(), seq)
            }
            Object offset = f.get(\'offset\')
            try {  // an offset of 2^63 or more is beyond any segment: bad_segment, once it exists
''')
    s.append('''                view = reader.view(segment, offset instanceof Long ? (Long) offset : Long.MAX_VALUE, nbytes)
            } catch (SegmentError e) {
                if (e.missing) {
                    missing++
                    throw new ProtocolError(P.SEGMENT_MISSING, e.message, seq)
                }
                throw new ProtocolError(P.BAD_SEGMENT, e.message, seq)
            }
        }
        try {
            Layout L = Layout.of(f, (List) f.get(\'shape\'), Messages.isRgb(f))
            // Copy out, then the credit goes back at once, then the image is updated.
            images.put(f, L, view, { reply.call(P.ack(seq), true) })  // a frame\'s ack: may be held
        } finally {
            SegmentReader.unmap(view.temporary)
        }
        long dropped = Check.big(f.get(\'dropped\')).min(BigInteger.valueOf(Long.MAX_VALUE)).longValue()
        if (dropped > sender.dropped) {
            senderDropped += dropped - sender.dropped
            sender.dropped = dropped
        }
        frames++
        bytes += nbytes
        if (segment == null) inlineFrames++ else shmFrames++
    }

    /** What a `report` control message answers: receiver.py\'s counters plus the images. */
    Map report() {
        if (images.gui) images.refresh()  // report what is on screen now
        images.save()
        Map state = [
            receiver: id, viewer: Local.VIEWER, frames: frames, rois: rois, bytes: bytes,
            rejected: rejected, dropped: missing + senderDropped, senders: senders.size(),
            last_error: lastError, missing: missing, sender_dropped: senderDropped,
            shm_frames: shmFrames, inline_frames: inlineFrames, empty_frames: images.emptyFrames,
            fps: fps, mapped_segments: reader.maps.size(), imagej: IJ.getVersion(),
            output_dir: images.outputDir?.path, auth_refused: authRefused, images: images.describe(),
        ] as LinkedHashMap
        if (images.gui) {  // what a user sees: open image windows, ROI Manager entries
            state.put(\'windows\', ij.WindowManager.getImageCount())
            state.put(\'roi_manager\', ij.plugin.frame.RoiManager.getInstance()?.getCount() ?: 0)
        }
        if (images.outputDir != null) {
            File tmp = new File(images.outputDir, \'report.json.tmp\')
            tmp.setText(Json.encode(state), \'UTF-8\')
            Files.move(tmp.toPath(), new File(images.outputDir, \'report.json\').toPath(), StandardCopyOption.REPLACE_EXISTING)
        }
        return state
    }

    void reject(String identity, String code, String message, Object seq, Closure reply) {
        rejected++
        lastError = "${code}: ${message}".toString()
        images.log("rejected message ${seq}: ${lastError}".toString())
        reply.call(P.error(seq, code, message))
    }

    void close() { reader.close() }
}

/**
 * JeroMQ\'s socket called through reflection from compiled code. The script loads JeroMQ at
 * run time (a missing jar is a readable message, not a compile error), so calls from the
 * script body are dynamic Groovy; per message they cost more than the decoding (Groovy 4\'s
 * invokedynamic call sites most), hence this small statically compiled wrapper.
 */
@CompileStatic
class Wire {
    private static final Object[] NO_ARGS = new Object[0]
    private static final Integer BLOCKING = Integer.valueOf(0)
    final Object socket
    private final Method recvMethod, hasMoreMethod, sendMethod
    private final Integer sendMore, sendLast, dontWait

    Wire(Object socket, int sendMoreFlags, int sendLastFlags) {
        this.socket = socket
        Class<?> type = socket.getClass()
        recvMethod = type.getMethod(\'recv\', Integer.TYPE)
        hasMoreMethod = type.getMethod(\'hasReceiveMore\')
        sendMethod = type.getMethod(\'send\', byte[].class, Integer.TYPE)
        sendMore = Integer.valueOf(sendMoreFlags)
        sendLast = Integer.valueOf(sendLastFlags)
        dontWait = sendLast
    }

    /** The next message part, or null when the receive timeout passes first. */
    byte[] recv() { (byte[]) call(recvMethod, BLOCKING) }

    /** The next message part if one is waiting, else null at once. */
    byte[] recvNow() { (byte[]) call(recvMethod, dontWait) }

    boolean hasMore() { (Boolean) call(hasMoreMethod, NO_ARGS) }

    /** A reply of two parts (routing id, body), never blocking: a sender that is gone or not
     * reading times out on its own. */
    void reply(byte[] identity, byte[] body) {
        try {
            call(sendMethod, identity, sendMore)
            call(sendMethod, body, sendLast)
        } catch (Exception ignored) {
            // dropped
        }
    }

    private Object call(Method method, Object... args) {
        try {
            return method.invoke(socket, args)
        } catch (java.lang.reflect.InvocationTargetException e) {
            throw e.getCause()  // JeroMQ\'s own exception, as a direct call would throw it
        }
    }
}

/**
 * The receive loop (on the worker thread): one message at a time to Core.handle, replies to
 * the message\'s sender, and housekeeping between messages (redraw, fps, unlinked segments).
 *
 * Frame acks (only those: protocol.md) are held while more messages already wait (at most
 * MAX_HELD_ACKS), then sent together, and always before any other reply and before anything
 * is drawn; a sender whose
 * hello asked for `batch_acks` gets its held acks as one `ack` (`also`: the later frames).
 * Each send that finds JeroMQ\'s I/O thread asleep wakes it through a pipe; on a busy machine
 * the woken thread preempts this one between writing the wake-up byte and counting it, and
 * then spins until this thread runs again (JeroMQ 0.3 to 0.6; about 1 ms of CPU per frame,
 * half the throughput on two cores). One wake-up per burst instead of one per frame avoids
 * most of it, and one message instead of several saves JeroMQ the rest of the work.
 */
@CompileStatic
class ReceiveLoop {
    final Wire wire
    final Core core
    final Images images
    final AtomicBoolean stop
    final boolean gui
    final Closure status  // called once a second (the GUI\'s status line), may be null
    private byte[] current  // routing id of the message being handled
    static final int MAX_HELD_ACKS = 4
    private final List<byte[]> heldIds = new ArrayList<byte[]>()
    private final List<Object> heldSeqs = new ArrayList<Object>()
    private final Closure replyToCurrent = { Map message, boolean frameAck = false ->
        if (frameAck && heldSeqs.size() < MAX_HELD_ACKS) {
            heldIds.add(current)
            heldSeqs.add(message.get(\'seq\'))
        } else {
            flushAcks()
            wire.reply(current, Json.encodeUtf8(message))
        }
    }

    /** Sends the held acks in order, those of a `batch_acks` sender as one message. */
    void flushAcks() {
        int n = heldSeqs.size()
        boolean[] sent = new boolean[n]
        for (int k = 0; k < n; k++) {
            if (sent[k]) continue
            byte[] id = heldIds.get(k)
            List<Object> also = new ArrayList<Object>()
            if (core.batchAcks(new String(id, StandardCharsets.ISO_8859_1))) {
                for (int j = k + 1; j < n; j++) {
                    if (!sent[j] && Arrays.equals(heldIds.get(j), id)) {
                        also.add(heldSeqs.get(j))
                        sent[j] = true
                    }
                }
            }
            wire.reply(id, Json.encodeUtf8(P.ack(heldSeqs.get(k), also)))
        }
        heldIds.clear()
        heldSeqs.clear()
    }

    ReceiveLoop(Wire wire, Core core, Images images, AtomicBoolean stop, boolean gui, Closure status) {
        this.wire = wire
        this.core = core
        this.images = images
        this.stop = stop
        this.gui = gui
        this.status = status
        images.beforeDraw = { flushAcks() }
    }

    void run() {
        long lastTick = System.nanoTime(), lastDraw = 0, framesAtTick = 0
        while (!stop.get()) {
            byte[] identity = null
            try {
                if (!heldSeqs.isEmpty()) {
                    identity = heldSeqs.size() < MAX_HELD_ACKS ? wire.recvNow() : null
                    if (identity == null) flushAcks()
                }
                if (identity == null) identity = wire.recv()
            } catch (Throwable e) {
                if (e instanceof ThreadDeath) throw e
                if (stop.get()) break
                images.log("receive failed: ${e}".toString())
                Thread.sleep(100)  // a broken socket must not become a busy loop
            }
            if (identity != null) {
                List<byte[]> parts = new ArrayList<byte[]>(2)
                int count = 0
                while (wire.hasMore()) {
                    byte[] part = wire.recv()
                    count++
                    if (parts.size() < 2) parts.add(part)  // more parts are counted, not kept
                }
                current = identity
                core.handle(new String(identity, StandardCharsets.ISO_8859_1), parts, count, replyToCurrent)
            }
            long now = System.nanoTime()
            try {  // housekeeping; a failure here is logged, never fatal
                if (gui && now - lastDraw > 50_000_000L) {  // redraw at most ~20 times a second
                    lastDraw = now
                    images.refresh()
                }
                if (now - lastTick >= 1_000_000_000L) {
                    core.fps = (core.frames - framesAtTick) * 1e9d / (now - lastTick)
                    lastTick = now
                    framesAtTick = core.frames
                    core.reader.forgetUnlinked()
                    if (status != null) status.call()
                }
            } catch (Exception e) {
                images.log("housekeeping failed: ${e}".toString())
            }
        }
        flushAcks()
    }
}

// ==========================================================================================
// 8. Authentication (docs/protocol.md, "Handshake and authentication"): the user\'s credential
//    file, the same one Python reads (polystore/streaming/credential.py)
// ==========================================================================================

@CompileStatic
class CredentialError extends Exception {
    CredentialError(String message) { super(message) }
}

/**
 * The user\'s CURVE key pair in $POLYSTORE_CREDENTIAL, else
 * ${XDG_CONFIG_HOME:-~/.config}/polystore/credential.json: made on first use (directory 0700,
 * file 0600, linked into place so a concurrent creator\'s file wins), and refused unless it is
 * a regular file (not a link) of this user that nobody else can read or write.
 */
@CompileStatic
class Credentials {
    static final Pattern Z85_KEY = Pattern.compile(\'[0-9a-zA-Z.:+=^!/*?&<>()\\\\[\\\\]{}@%$#-]{40}\')

    static Path path() {
        String explicit = System.getenv(\'POLYSTORE_CREDENTIAL\')
        if (explicit) return Paths.get(explicit)
        String config = System.getenv(\'XDG_CONFIG_HOME\') ?: System.getProperty(\'user.home\') + \'/.config\'
        return Paths.get(config, \'polystore\', \'credential.json\')
    }

    /** (curve_public, curve_secret) as Z85 text; `keypair` makes a new pair if needed. */
    static Map<String, String> load(Closure<List<String>> keypair) throws CredentialError {
        Path p = path()
        if (!Files.exists(p, LinkOption.NOFOLLOW_LINKS)) create(p, keypair.call())
        return read(p)
    }

    static void create(Path p, List<String> keys) throws CredentialError {
        try {
            def owner = java.nio.file.attribute.PosixFilePermissions.fromString(\'rwx------\')
            Files.createDirectories(p.getParent(), java.nio.file.attribute.PosixFilePermissions.asFileAttribute(owner))
            Path tmp = p.resolveSibling(".${p.getFileName()}.${Long.toHexString(new Random().nextLong())}.tmp".toString())
            def rw = java.nio.file.attribute.PosixFilePermissions.fromString(\'rw-------\')
            Files.createFile(tmp, java.nio.file.attribute.PosixFilePermissions.asFileAttribute(rw))
            try {
                Files.write(tmp, Json.encodeUtf8([version: 1, curve_public: keys[0], curve_secret: keys[1]]))
                try {
                    Files.createLink(p, tmp)  // never overwrites: a concurrent creator\'s file stays
                } catch (java.nio.file.FileAlreadyExistsException ignored) {
                    // another process made it first: read theirs
                }
            } finally {
                Files.deleteIfExists(tmp)
            }
        } catch (IOException e) {
            throw new CredentialError("cannot create the polystore credential ${p}: ${e}".toString())
        }
    }

    static Map<String, String> read(Path p) throws CredentialError {
        Map<String, Object> a
        try {
            a = Files.readAttributes(p, \'unix:uid,mode,isRegularFile,isSymbolicLink,size\', LinkOption.NOFOLLOW_LINKS)
        } catch (IOException e) {
            throw new CredentialError("cannot read the polystore credential ${p}: ${e}".toString())
        }
        if (a.get(\'isSymbolicLink\')) throw new CredentialError("the polystore credential ${p} is a symbolic link; replace it by the file itself".toString())
        if (!a.get(\'isRegularFile\')) throw new CredentialError("the polystore credential ${p} is not a regular file; remove it (a new one is made on the next start)".toString())
        if (a.get(\'uid\') != SegmentReader.ownUid()) throw new CredentialError("the polystore credential ${p} belongs to another user; remove it (a new one is made on the next start)".toString())
        if ((((Integer) a.get(\'mode\')) & 0077) != 0) throw new CredentialError("the polystore credential ${p} can be read or written by other accounts; run: chmod 600 ${p}".toString())
        if (((Long) a.get(\'size\')) > 4096) throw new CredentialError("the polystore credential ${p} is too large to be one; remove it".toString())
        Object json
        try {
            json = Json.parseUtf8(Files.readAllBytes(p))
        } catch (Exception e) {
            throw new CredentialError("the polystore credential ${p} is not valid JSON (${e.message}); remove it".toString())
        }
        Map m = json instanceof Map ? (Map) json : [:]
        String pub = m.get(\'curve_public\') instanceof String ? (String) m.get(\'curve_public\') : \'\'
        String sec = m.get(\'curve_secret\') instanceof String ? (String) m.get(\'curve_secret\') : \'\'
        if (m.get(\'version\') != (Object) 1L || !Z85_KEY.matcher(pub).matches() || !Z85_KEY.matcher(sec).matches()) {
            throw new CredentialError("the polystore credential ${p} is not a version 1 credential with two 40-character Z85 keys; remove it".toString())
        }
        return [curve_public: pub, curve_secret: sec]
    }
}

// ==========================================================================================
// 9. Main: parameters, socket, loop, stopping (JeroMQ is used dynamically so that a missing
//    jar gives a readable message instead of a compile error)
// ==========================================================================================

def param = { String name, Object dflt ->
    binding.hasVariable(name) && binding.getVariable(name) != null ? binding.getVariable(name) : dflt
}
String endpointParam = param(\'endpoint\', \'tcp://127.0.0.1:55556\').toString().trim()
String modeParam = param(\'mode\', \'replace\').toString()
String channelDisplayParam = param(\'channel_display\', \'composite\').toString()
Object outParam = param(\'output_dir\', null)
File outputDir = outParam == null || outParam.toString().trim().isEmpty() ? null : new File(outParam.toString())
boolean allowRemote = param(\'allow_remote\', false) as boolean
boolean useRoiManager = param(\'roi_manager\', true) as boolean
boolean stopOnEof = param(\'stop_on_stdin_eof\', false) as boolean
boolean allowUnauthenticated = param(\'allow_unauthenticated\', false) as boolean
int maxSendersParam = param(\'max_senders\', Local.MAX_SENDERS) as int
boolean gui = !GraphicsEnvironment.isHeadless() && IJ.getInstance() != null

def say = { String msg ->
    println "polystore-fiji: ${msg}"  // Fiji\'s console, or the launching process
    System.out.flush()
    if (gui) IJ.log("polystore: ${msg}")
}
def fail = { String msg ->
    if (gui) IJ.error(\'polystore receiver\', msg)
    throw new IllegalArgumentException(msg)
}

if (!(modeParam in [\'replace\', \'stack\'])) fail("mode must be replace or stack, got \'${modeParam}\'")
if (!(channelDisplayParam in [\'composite\', \'color\', \'grayscale\'])) fail("channel_display must be composite, color or grayscale, got \'${channelDisplayParam}\'")
if (maxSendersParam < 1) fail("max_senders must be at least 1, got ${maxSendersParam}")

// Loopback only unless asked (receiver.py: check_bind_endpoint).
def matcher = endpointParam =~ /^tcp:\\/\\/(\\[[0-9A-Fa-f:.]+\\]|[^:\\/\\[\\]]+):(\\d+|\\*)$/
if (!matcher.matches()) fail("endpoint must look like tcp://127.0.0.1:PORT, got \'${endpointParam}\' (JeroMQ cannot use ipc://)")
String host = matcher.group(1)
String port = matcher.group(2)
// JeroMQ says only "port out of range" (receiver.py: endpoints.check_listen_port).
if (port != \'*\' && (port.length() > 5 || port.toInteger() > 65535)) fail("endpoint \'${endpointParam}\' needs a TCP port from 0 to 65535 (0 or * for any free one), got \'${port}\'; e.g. tcp://127.0.0.1:55556")
String bareHost = host.startsWith(\'[\') ? host[1..-2] : host
boolean loopback = bareHost == \'localhost\' || bareHost == \'::1\' || bareHost ==~ /127\\.\\d+\\.\\d+\\.\\d+/
if (!loopback && !allowRemote) {
    fail("refusing to listen on ${host}: that exposes the receiver beyond this machine. Tick \'Allow remote senders\' (allow_remote=true) to do it on purpose; senders then need your polystore credential (or prefer an SSH tunnel)")
}

Class zmq
try {
    zmq = Class.forName(\'org.zeromq.ZMQ\', true, this.class.classLoader)
} catch (ClassNotFoundException ignored) {
    fail(\'JeroMQ is not on the classpath: put jeromq-<version>.jar into Fiji.app/jars/ and restart Fiji (see docs/fiji.md)\')
}

// Same-user authentication: CURVE with the user\'s credential (JeroMQ >= 0.5), else refuse
// unless the user allows unauthenticated senders on purpose.
Class curve = null
try {
    curve = Class.forName(\'org.zeromq.ZMQ$Curve\', true, this.class.classLoader)
} catch (ClassNotFoundException ignored) {
    curve = null  // JeroMQ 0.3: no CURVE
}
Map<String, String> credential = null
if (allowUnauthenticated) {
    String warning = "WARNING: authentication is OFF (allow_unauthenticated): any account on this machine${allowRemote ? \' and any computer that reaches this port\' : \'\'} can send images to this receiver, and read back what it reports. Send with auth=\\"none\\" (POLYSTORE_AUTH=none). ${curve == null ? \'Upgrade JeroMQ to 0.6 (docs/fiji.md) to authenticate senders.\' : \'\'}"
    System.err.println("polystore-fiji: ${warning}")
    if (gui) IJ.log("polystore: ${warning}")  // and in the receiver\'s window, below (no modal dialog: it would block a headless-run Fiji)
} else if (curve == null) {
    fail(\'This JeroMQ (0.3) cannot authenticate senders, so any account on this machine could send to this receiver. Upgrade: download jeromq-0.6.0.jar from Maven Central (group org.zeromq, artifact jeromq), put it into Fiji.app/jars/, remove the old jeromq-0.3.*.jar there, and restart Fiji (docs/fiji.md). Or, on a machine only you use, tick "Allow unauthenticated senders" (allow_unauthenticated=true) and send with auth="none".\')
} else {
    try {
        credential = Credentials.load({ -> def pair = curve.generateKeyPair(); [pair.publicKey, pair.secretKey] as List<String> })
    } catch (CredentialError e) {
        fail(e.message)
    }
}

Images images = new Images(modeParam, channelDisplayParam, gui, useRoiManager, outputDir)
Core core = new Core(images, maxSendersParam)

/*
 * The socket lives on a worker thread outside the script\'s ThreadGroup. Fiji\'s Script Editor
 * runs a script in a ThreadGroup of its own and "Kill" interrupts (then, where the JVM still
 * can, stops) every thread of that group. JeroMQ\'s I/O and reaper threads inherit the group of
 * the thread that creates the context; interrupted, their selectors break and they spin while
 * the port stays bound (JeroMQ issues #251, #172). Here the script\'s own thread only waits:
 * interrupted or stopped, it tells the worker to stop, and the worker closes the socket and
 * terminates the context, which frees the port.
 */
ThreadGroup outside = Thread.currentThread().getThreadGroup()
while (outside.getParent() != null) outside = outside.getParent()

AtomicBoolean stop = new AtomicBoolean(false)
CountDownLatch started = new CountDownLatch(1)  // bound (or failed to)
CountDownLatch done = new CountDownLatch(1)     // socket closed, context terminated
String bound = null
String startError = null
def window = null
def statusLabel = null

Runnable receive = {
    def ctx = zmq.context(1)
    def sock = ctx.socket(zmq.ROUTER)
    def zap = null
    Thread zapThread = null
    try {
        if (credential != null) {  // ZAP (RFC 27): admit only clients with the user\'s key
            byte[] allowed = curve.z85Decode(credential.curve_public)
            zap = ctx.socket(zmq.REP)
            zap.setReceiveTimeOut(100)
            zap.bind(\'inproc://zeromq.zap.01\')
            def zapSocket = zap
            zapThread = new Thread(outside, {
                try {
                    while (!stop.get()) {
                        byte[] version = zapSocket.recv(0)
                        if (version == null) continue
                        List<byte[]> request = [version]
                        while (zapSocket.hasReceiveMore()) request << zapSocket.recv(0)
                        boolean ok = request.size() >= 7 && new String(request[5], \'US-ASCII\') == \'CURVE\' && Arrays.equals(request[6], allowed)
                        if (!ok) core.authRefused++
                        byte[] id = request.size() > 1 ? request[1] : new byte[0]
                        zapSocket.send(\'1.0\'.bytes, zmq.SNDMORE)
                        zapSocket.send(id, zmq.SNDMORE)
                        zapSocket.send((ok ? \'200\' : \'400\').bytes, zmq.SNDMORE)
                        zapSocket.send((ok ? \'OK\' : \'not this user\\\'s polystore credential\').bytes, zmq.SNDMORE)
                        zapSocket.send(new byte[0], zmq.SNDMORE)
                        zapSocket.send(new byte[0], 0)
                    }
                } catch (Throwable t) {
                    if (!stop.get()) images.log("authentication handler stopped: ${t}")
                } finally {
                    try { zapSocket.close() } catch (Exception ignored) { }
                }
            } as Runnable, \'polystore-fiji-zap\')
            zapThread.daemon = true
            zapThread.start()
            sock.setZapDomain(\'polystore\')
            sock.setCurveServer(true)
            sock.setCurveSecretKey(curve.z85Decode(credential.curve_secret))
        }
        sock.setLinger(0)
        // tcp://[::1]:PORT, as the Python receiver (JeroMQ speaks IPv4 unless told; 0.5/0.6
        // spell it setIPv6, 0.3 setIPv4Only(false))
        if (host.startsWith(\'[\')) {
            try { sock.setIPv6(true) } catch (MissingMethodException ignored) { sock.setIPv4Only(false) }
        }
        // Close connections that have not finished the handshake within 5 s, as the Python
        // receiver does (JeroMQ\'s default is 30 s; 0.3 has neither the option nor CURVE).
        try { sock.setHandshakeIvl(5000) } catch (MissingMethodException ignored) { }
        // Per sender. Not lower: JeroMQ 0.5/0.6 CURVE garbles or drops messages when a pipe
        // reaches its high-water mark (JeroMQ issue #1009; 12 of 60 pipelined frames came in
        // as "not valid UTF-8" at 16 here). Senders keep <= 16 frames in flight (credits).
        sock.setRcvHWM(1000)
        sock.setMaxMsgSize(Local.MAX_FRAME_BYTES + P.MAX_HEADER_BYTES)
        sock.setReceiveTimeOut(100)  // wake up to stop, housekeep and redraw
        try {
            if (port == \'0\' || port == \'*\') bound = "tcp://${host}:${sock.bindToRandomPort("tcp://${host}")}"
            else { sock.bind(endpointParam); bound = endpointParam }
        } catch (Exception e) {
            String why = e.message ?: e.toString()
            // JeroMQ 0.3 says only "Errno 48": its number for EADDRINUSE
            boolean inUse = why.toLowerCase().contains(\'in use\') || why.contains(\'Errno 48\') || (e.respondsTo(\'getErrorCode\') && e.getErrorCode() == 48)
            startError = "cannot listen on ${endpointParam}: " + (inUse ? "the address is in use (${why}). Is another polystore receiver already running there? Stop it or choose another endpoint" : "${why}. Check the endpoint")
            return
        }
        started.countDown()
        Closure status = {  // the window is made once the socket listens
            if (statusLabel != null) statusLabel.text = "${bound}: ${core.frames} frames, ${String.format(\'%.1f\', core.fps)} fps, ${core.rejected} rejected${credential == null ? \', UNAUTHENTICATED\' : \'\'}"
        }
        new ReceiveLoop(new Wire(sock, zmq.SNDMORE | zmq.DONTWAIT, zmq.DONTWAIT), core, images, stop, gui, status).run()
    } catch (Throwable t) {
        images.log("receiver stopped by an error: ${t}")
    } finally {
        try { sock.close() } catch (Exception ignored) { }
        stop.set(true)  // also ends the ZAP thread, which closes its socket before term()
        if (zapThread != null) zapThread.join(2000)
        try { ctx.term() } catch (Exception ignored) { }
        core.close()
        started.countDown()
        done.countDown()
    }
} as Runnable
Thread worker = new Thread(outside, receive, \'polystore-fiji-receiver\')
worker.daemon = true  // never keeps Fiji\'s JVM alive
worker.start()
Thread hook = null
CountDownLatch farewell = new CountDownLatch(1)  // counted down after the last line is said
try {  // from here on, whatever happens (Kill included), the worker is told to stop
    started.await()
    if (startError != null) return  // reported below, once the worker has cleaned up

    hook = new Thread(outside, {
        stop.set(true)
        // let the worker close the socket and the script say its last line: the JVM halts
        // as soon as this hook returns (SIGTERM), which could cut that line off
        farewell.await(3, TimeUnit.SECONDS)
    } as Runnable, \'polystore-fiji-shutdown\')
    Runtime.runtime.addShutdownHook(hook)
    if (stopOnEof) {
        Thread watcher = new Thread(outside, {
            try { while (System.in.read() >= 0) { } } catch (IOException ignored) { }
            stop.set(true)
        } as Runnable, \'polystore-fiji-stdin\')
        watcher.daemon = true
        watcher.start()
    }
    if (gui) {  // a small window with counters and a Stop button
        String unauthenticated = credential == null ? \' - UNAUTHENTICATED: any local account can send\' : \'\'
        window = new java.awt.Frame("polystore receiver - ${bound}${unauthenticated}")
        statusLabel = new java.awt.Label("listening on ${bound}${unauthenticated}")
        def button = new java.awt.Button(\'Stop\')
        button.addActionListener({ stop.set(true) } as java.awt.event.ActionListener)
        window.add(statusLabel, java.awt.BorderLayout.CENTER)
        window.add(button, java.awt.BorderLayout.EAST)
        window.addWindowListener([windowClosing: { stop.set(true) }] as java.awt.event.WindowAdapter)
        window.setSize(460, 70)
        window.visible = true
    }

    say("listening on ${bound} (ImageJ ${IJ.getVersion()}, ${gui ? \'GUI\' : \'headless\'}, mode ${modeParam}${outputDir ? \', output \' + outputDir : \'\'})")

    // until Stop, the window closed, stdin closed, SIGTERM, or Kill (interrupt); then the
    // worker gets 3 s below: JeroMQ 0.3\'s I/O thread can die (a connection flood up to the
    // descriptor limit), and term() then never returns
    while (!stop.get() && !done.await(100, TimeUnit.MILLISECONDS)) { }
} catch (InterruptedException ignored) {
    // Script Editor\'s Kill: stop below
} finally {  // also on Thread.stop (ThreadDeath): the worker frees the port
    stop.set(true)
    long deadline = System.nanoTime() + 3_000_000_000L
    while (done.getCount() > 0 && System.nanoTime() < deadline) {
        try { done.await(50, TimeUnit.MILLISECONDS) } catch (InterruptedException ignored) { }  // a second Kill
    }
    if (window != null) window.dispose()
    if (startError != null) fail(startError)
    say("stopped after ${core.frames} frames, ${core.rejected} rejected")
    farewell.countDown()
    try { if (hook != null) Runtime.runtime.removeShutdownHook(hook) } catch (IllegalStateException ignored) { }  // already shutting down
}
''')
    return s.toString()
}
