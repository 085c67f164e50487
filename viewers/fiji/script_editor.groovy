/*
 * Run a Fiji script the way Fiji's Script Editor does, several times in one JVM, and kill or
 * stop it the way a user does; for the tests (tests/test_fiji.py) and scripts/bench_fiji.py.
 *
 *   java -cp groovy.jar:ij.jar:jeromq.jar groovy.ui.GroovyMain script_editor.groovy SCRIPT
 *
 * Commands, one per line on standard input; each answers one line starting with "= ":
 *   run PARAMS   evaluate SCRIPT (parameters as for headless.groovy) on a new thread in a new
 *                ThreadGroup, as the Script Editor's Run; answers once the script prints
 *                "listening on" (with the seconds it took) or ends
 *   kill         the Script Editor's Kill: interrupt every thread of the run's group, wait
 *                up to a second, then Thread.stop those still alive (where the JVM has it)
 *   interrupt    Kill as on Java 20 and later (current Fiji runs 21), where Thread.stop is
 *                gone: interrupt the group and wait up to 5 seconds, nothing more
 *   stop         press the Stop button of the receiver's window (needs a display)
 *   threads      CPU use of every live thread over the next second, as JSON
 *   macro CODE   run one line of ImageJ macro code as a user does (Plugins > Macros > Run, or
 *                what the Macro Recorder writes for a dialog, e.g. setMinAndMax for the
 *                Brightness/Contrast "Set"); answers what the macro returns
 *   screenshot F save the whole screen as PNG file F (needs a display)
 *   quit         end the JVM
 * The script's own output goes to standard output as usual.
 */

import groovy.json.JsonOutput

import java.lang.management.ManagementFactory
import java.util.concurrent.CountDownLatch
import java.util.concurrent.TimeUnit

if (args.length < 1) {
    System.err.println('usage: script_editor.groovy SCRIPT')
    System.exit(2)
}
File script = new File(args[0])
if (System.getenv('POLYSTORE_FIJI_GUI') == '1') new ij.ImageJ()

PrintStream out = System.out
def answer = { String text -> synchronized (out) { out.println("= ${text}"); out.flush() } }

// Bind `#@` parameters the way headless.groovy does: run it in "bind only" mode.
Binding bind(File script, String params) {
    def shell = new GroovyShell(this.class.classLoader)
    def headless = new File(script.absoluteFile.parentFile, 'headless.groovy')  // next to the script
    Script parser = shell.parse(headless)
    parser.binding = new Binding([args: [script.path, params] as String[], bindOnly: true])
    return (Binding) parser.run()
}

ThreadGroup group = null
Thread runner = null
int runs = 0
BufferedReader input = new BufferedReader(new InputStreamReader(System.in, 'UTF-8'))
String line
while ((line = input.readLine()) != null) {
    String command = line.trim()
    try {
        if (command.startsWith('run')) {
            String params = command.length() > 3 ? command.substring(3).trim() : ''
            runs++
            Binding binding = bind(script, params)
            String source = binding.getVariable('__source__')
            binding.variables.remove('__source__')
            CountDownLatch listening = new CountDownLatch(1)
            // The script prints "listening on" to System.out: watch for it on a tee.
            def tee = new PrintStream(new OutputStream() {
                StringBuilder current = new StringBuilder()
                void write(int b) {
                    out.write(b)
                    if (b == 10) {
                        if (current.indexOf('listening on') >= 0) listening.countDown()
                        current = new StringBuilder()
                    } else current.append((char) b)
                }
                void flush() { out.flush() }
            }, true)
            System.setOut(tee)
            group = new ThreadGroup("script editor run ${runs}")
            long t0 = System.nanoTime()
            runner = new Thread(group, {
                try {
                    new GroovyShell(this.class.classLoader, binding).evaluate(source, script.name)
                } catch (Throwable t) {
                    System.err.println("${script.name} ended with ${t}")
                } finally {
                    listening.countDown()
                }
            } as Runnable, "script editor run ${runs}")
            runner.start()
            listening.await()
            double seconds = (System.nanoTime() - t0) / 1e9
            answer(runner.isAlive() ? String.format('listening %.2f', seconds) : 'ended')
        } else if (command == 'kill' || command == 'interrupt') {
            if (group == null) { answer("nothing to ${command}"); continue }
            boolean stopAfter = command == 'kill'  // 'interrupt': no Thread.stop, as on Java 20+
            group.interrupt()
            runner.join(stopAfter ? 1000 : 5000)
            String how = 'interrupted'
            if (stopAfter && runner.isAlive()) {
                Thread[] threads = new Thread[group.activeCount() + 8]
                int n = group.enumerate(threads, true)
                for (int k = 0; k < n; k++) {
                    try {
                        threads[k].stop()
                        how = 'stopped'
                    } catch (UnsupportedOperationException ignored) {
                        how = 'interrupted (Thread.stop unsupported on this JVM)'
                    }
                }
                runner.join(2000)
            }
            answer("${how}; script thread ${runner.isAlive() ? 'still alive' : 'ended'}")
        } else if (command == 'stop') {
            def frame = java.awt.Frame.getFrames().find { it.visible && it.title.startsWith('polystore receiver') }
            def button = frame?.components?.find { it instanceof java.awt.Button && it.label == 'Stop' }
            if (button == null) { answer('no Stop button'); continue }
            java.awt.EventQueue.invokeAndWait {
                for (def l : button.actionListeners) l.actionPerformed(new java.awt.event.ActionEvent(button, java.awt.event.ActionEvent.ACTION_PERFORMED, 'Stop'))
            }
            runner.join(5000)
            answer("pressed Stop; script thread ${runner.isAlive() ? 'still alive' : 'ended'}")
        } else if (command == 'threads') {
            def mx = ManagementFactory.getThreadMXBean()
            Map<Long, Long> before = [:]
            Map<Long, Thread> live = [:]
            for (Thread t : Thread.getAllStackTraces().keySet()) { live[t.id] = t; before[t.id] = mx.getThreadCpuTime(t.id) }
            Thread.sleep(1000)
            List rows = []
            for (Thread t : live.values()) {
                long after = mx.getThreadCpuTime(t.id)
                if (!t.isAlive() || after < 0 || before[t.id] < 0) continue
                rows << [name: t.name, group: t.threadGroup?.name, cpu: (after - before[t.id]) / 1e9]
            }
            answer(JsonOutput.toJson(rows))
        } else if (command.startsWith('macro ')) {
            String result = ij.IJ.runMacro(command.substring('macro '.length()))
            answer(result == null ? '' : result.replace('\n', ' '))
        } else if (command.startsWith('screenshot ')) {  // the whole (virtual) screen as PNG
            File png = new File(command.substring('screenshot '.length()).trim())
            def screen = new java.awt.Rectangle(java.awt.Toolkit.defaultToolkit.screenSize)
            javax.imageio.ImageIO.write(new java.awt.Robot().createScreenCapture(screen), 'png', png)
            answer("saved ${png}")
        } else if (command == 'quit') {
            answer('bye')
            break
        } else {
            answer("unknown command ${command}")
        }
    } catch (Throwable t) {
        answer("error ${t}")
    }
}
System.exit(0)
