# The chart of bench/RESULTS.md: extra worker CPU per request, per variant.
#   gnuplot -e "datafile='rows.dat'; outfile='bench/overhead.png'" bench/overhead.gp
# rows.dat: <index> "<variant>" <overhead %>
set terminal pngcairo noenhanced size 1000,560 font 'sans,10'
set output outfile
set title 'Extra worker CPU per request, counting in log_by_lua, against no counting (lower is better; run-to-run spread here is about 15 points)'
set ylabel 'extra CPU per request (%)'
set style fill solid 0.8
set boxwidth 0.6
set xtics rotate by -25 left
set grid ytics
set key off
set bmargin 10
set rmargin 18
plot datafile using 1:3:xtic(2) with boxes lc rgb '#4472c4', \
     '' using 1:3:(sprintf('%.1f%%', $3)) with labels offset 0,1
